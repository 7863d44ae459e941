"""The tokenizer half of a llama2.c checkpoint: ``tokenizer.bin`` or SentencePiece ``.model``.

llama2.c (https://github.com/karpathy/llama2.c) ships its vocabulary either in its own
``tokenizer.bin`` format (``tok512.bin``) or as the SentencePiece model it was exported from
(``tok512.model``). :func:`read_llama2c_tokenizer` reads either into :class:`Llama2cTokenizer`;
:func:`build_tokenizer` turns that into a Hugging Face ``tokenizers`` BPE tokenizer with
SentencePiece's byte fallback, and :func:`tokenizer_config` gives its ``tokenizer_config.json``.
The SentencePiece ``ModelProto`` is parsed from the protobuf wire format directly (field
numbers from sentencepiece's ``sentencepiece_model.proto``), so no ``sentencepiece`` install is
needed. The weights half is :mod:`deepwhale.checkpoint.llama2c`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BOS",
    "EOS",
    "UNK",
    "SPACE_SYMBOL",
    "Llama2cTokenizer",
    "read_llama2c_tokenizer",
    "build_tokenizer",
    "tokenizer_config",
]

#: llama2.c ``tokenizer.bin`` layout: ids 0..2 are these strings, ids 3..258 the 256 byte pieces.
_BIN_SPECIALS = ("<unk>", "\n<s>\n", "\n</s>\n")
#: The names Hugging Face (and SentencePiece) use for the same three tokens.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_N_BYTE_PIECES = 256
_FIRST_BYTE_ID = 3
SPACE_SYMBOL = "\u2581"  # SentencePiece's "▁" (LOWER ONE EIGHTH BLOCK)

# SentencePiece ModelProto.SentencePiece.Type values.
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_BYTE = 1, 2, 3, 4, 6


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama2cTokenizer:
    """A SentencePiece-BPE vocabulary as used by llama2.c.

    ``pieces[i]`` is the piece of id ``i`` in SentencePiece spelling (``"▁"`` for a space;
    ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``; ids 3..258 are ``<0x00>``..``<0xFF>``),
    ``scores[i]`` its float32 score (higher = merged earlier). ``add_dummy_prefix`` and
    ``remove_extra_whitespaces`` are the SentencePiece normalizer flags.
    """

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _check_layout(path: Path, pieces: Sequence[str]) -> None:
    if len(pieces) < _FIRST_BYTE_ID + _N_BYTE_PIECES:
        raise ValueError(
            f"{path}: expected at least {_FIRST_BYTE_ID + _N_BYTE_PIECES} tokens "
            f"(<unk>, <s>, </s> and 256 byte pieces), got {len(pieces)}"
        )
    if tuple(pieces[:3]) != (UNK, BOS, EOS):
        raise ValueError(f"{path}: ids 0..2 must be <unk>, <s>, </s>; got {list(pieces[:3])!r}")
    for b in range(_N_BYTE_PIECES):
        want = f"<0x{b:02X}>"
        if pieces[_FIRST_BYTE_ID + b] != want:
            raise ValueError(
                f"{path}: id {_FIRST_BYTE_ID + b} must be the byte-fallback piece {want!r}, "
                f"got {pieces[_FIRST_BYTE_ID + b]!r}"
            )
    seen: set[str] = set()
    for i, piece in enumerate(pieces):
        if not piece:
            raise ValueError(f"{path}: token {i} is empty")
        if piece in seen:
            raise ValueError(f"{path}: duplicate piece {piece!r} (id {i})")
        seen.add(piece)


def _read_tokenizer_bin(path: Path, raw: bytes, vocab_size: int) -> Llama2cTokenizer:
    if len(raw) < 4:
        raise ValueError(f"{path}: expected at least 4 bytes (max_token_length), got {len(raw)}")
    (max_len,) = struct.unpack_from("<i", raw, 0)
    if not 0 < max_len <= 1024:
        raise ValueError(f"{path}: implausible max_token_length {max_len}; not a tokenizer.bin")
    offset = 4
    pieces: list[str] = []
    scores: list[float] = []
    for i in range(vocab_size):
        if offset + 8 > len(raw):
            raise ValueError(
                f"{path}: truncated tokenizer.bin: token {i} of {vocab_size} needs bytes "
                f"{offset}..{offset + 8}, file has {len(raw)} bytes"
            )
        score, length = struct.unpack_from("<fi", raw, offset)
        offset += 8
        if not 0 < length <= max_len or offset + length > len(raw):
            raise ValueError(
                f"{path}: token {i}: invalid length {length} (max_token_length {max_len}, "
                f"{len(raw) - offset} bytes left); not a tokenizer.bin for vocab_size {vocab_size}"
            )
        if not math.isfinite(score):
            raise ValueError(f"{path}: token {i} has a non-finite score {score}")
        try:
            text = raw[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: token {i} is not valid UTF-8: {e}") from None
        offset += length
        pieces.append(text)
        scores.append(float(score))
    if offset != len(raw):
        raise ValueError(
            f"{path}: {len(raw) - offset} trailing bytes after {vocab_size} tokens: expected "
            f"{offset} bytes, got {len(raw)} bytes (tokenizer does not match the checkpoint's "
            "vocab_size?)"
        )
    if tuple(pieces[:3]) != _BIN_SPECIALS:
        raise ValueError(
            f"{path}: ids 0..2 must be {list(_BIN_SPECIALS)!r} in a llama2.c tokenizer.bin; "
            f"got {pieces[:3]!r}"
        )
    # tokenizer.bin stores "<s>"/"</s>" as "\n<s>\n"/"\n</s>\n" and "▁" as a plain space.
    pieces = [UNK, BOS, EOS] + [
        p if i < _FIRST_BYTE_ID + _N_BYTE_PIECES else p.replace(" ", SPACE_SYMBOL)
        for i, p in enumerate(pieces[3:], start=3)
    ]
    _check_layout(path, pieces)
    # llama2.c's train_vocab keeps SentencePiece's normalizer defaults.
    return Llama2cTokenizer(tuple(pieces), tuple(scores), True, True)


def _protobuf_fields(data: bytes, where: str):
    """Yield ``(field_number, value)`` of one protobuf message (wire format: varints, 32/64-bit
    fixed, length-delimited bytes; https://protobuf.dev/programming-guides/encoding/).

    Raises:
        ValueError: truncated or malformed bytes.
    """
    i, n = 0, len(data)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError(f"{where}: truncated varint")
            b = data[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > n:
                raise ValueError(f"{where}: truncated fixed-width field")
            yield field, data[i : i + size]
            i += size
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError(f"{where}: truncated length-delimited field")
            yield field, data[i : i + size]
            i += size
        else:
            raise ValueError(f"{where}: unsupported wire type {wire}")


@dataclass
class _SentencePieceModel:
    """The parts of SentencePiece's ``ModelProto`` (sentencepiece_model.proto) we check; the
    defaults are the proto's."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = 1  # TrainerSpec.UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


_SP_BPE = 2  # TrainerSpec.ModelType.BPE


def _parse_sentencepiece(raw: bytes, where: str) -> _SentencePieceModel:
    """Decode a SentencePiece ``.model`` file without protobuf's generated code (whose gencode
    version must match the installed protobuf runtime, which Apache Beam pins lower).

    Raises:
        ValueError: the bytes are not a SentencePiece model.
    """
    m = _SentencePieceModel()
    for f, v in _protobuf_fields(raw, where):
        if f == 1:  # repeated SentencePiece pieces
            piece, score, kind = None, 0.0, _SP_NORMAL
            for g, w in _protobuf_fields(bytes(v), where):
                if g == 1:
                    piece = bytes(w).decode("utf-8")
                elif g == 2 and len(w) == 4:
                    score = struct.unpack("<f", w)[0]
                elif g == 3:
                    kind = int(w)
            if piece is None:
                raise ValueError(f"{where}: a piece without text")
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(kind)
        elif f == 2:  # TrainerSpec
            for g, w in _protobuf_fields(bytes(v), where):
                if g == 3:
                    m.model_type = int(w)
                elif g == 24:
                    m.treat_whitespace_as_suffix = bool(w)
                elif g == 35:
                    m.byte_fallback = bool(w)
        elif f == 3:  # NormalizerSpec
            for g, w in _protobuf_fields(bytes(v), where):
                if g == 1:
                    m.normalizer_name = bytes(w).decode("utf-8", "replace")
                elif g == 2:
                    m.precompiled_charsmap = bytes(w)
                elif g == 3:
                    m.add_dummy_prefix = bool(w)
                elif g == 4:
                    m.remove_extra_whitespaces = bool(w)
                elif g == 5:
                    m.escape_whitespaces = bool(w)
    if not m.pieces:
        raise ValueError(f"{where}: no pieces")
    return m


def _read_tokenizer_model(path: Path, raw: bytes, vocab_size: int) -> Llama2cTokenizer:
    try:
        proto = _parse_sentencepiece(raw, str(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model: {e}") from None
    if len(proto.pieces) != vocab_size:
        raise ValueError(
            f"{path}: expected {vocab_size} pieces (the checkpoint's vocab_size), "
            f"got {len(proto.pieces)}"
        )
    if proto.model_type != _SP_BPE:
        raise ValueError(f"{path}: only SentencePiece BPE models are supported")
    if not proto.byte_fallback:
        raise ValueError(f"{path}: the SentencePiece model must use byte_fallback")
    if proto.treat_whitespace_as_suffix:
        raise ValueError(f"{path}: treat_whitespace_as_suffix is not supported")
    if proto.precompiled_charsmap or proto.normalizer_name not in ("", "identity"):
        raise ValueError(
            f"{path}: normalization rule {proto.normalizer_name!r} is not supported "
            "(only 'identity')"
        )
    if not proto.escape_whitespaces:
        raise ValueError(f"{path}: escape_whitespaces=false is not supported")
    pieces = list(proto.pieces)
    types = list(proto.types)
    want = [_SP_UNKNOWN, _SP_CONTROL, _SP_CONTROL] + [_SP_BYTE] * _N_BYTE_PIECES
    if types[: len(want)] != want or any(t != _SP_NORMAL for t in types[len(want) :]):
        raise ValueError(
            f"{path}: unexpected piece types; need <unk>, <s>, </s>, 256 byte pieces, then "
            "only normal pieces"
        )
    _check_layout(path, pieces)
    scores = [float(x) for x in proto.scores]
    return Llama2cTokenizer(
        tuple(pieces), tuple(scores), proto.add_dummy_prefix, proto.remove_extra_whitespaces
    )


def read_llama2c_tokenizer(path: Path, vocab_size: int) -> Llama2cTokenizer:
    """Read a llama2.c ``tokenizer.bin`` or the SentencePiece ``.model`` it was exported from.

    ``tokenizer.bin`` (llama2.c ``tokenizer.py`` ``export`` / ``run.c`` ``build_tokenizer``):
    int32 ``max_token_length`` (bytes), then for each of ``vocab_size`` tokens a float32 score,
    an int32 byte length and that many UTF-8 bytes; "▁" is stored as a space and BOS/EOS as
    ``"\\n<s>\\n"`` / ``"\\n</s>\\n"`` (mapped back to ``"▁"``, ``<s>``, ``</s>`` here). The
    file stores no normalizer flags; llama2.c's ``train_vocab`` leaves SentencePiece's
    defaults, so ``add_dummy_prefix`` and ``remove_extra_whitespaces`` are both True. A file
    whose name ends in ``.model`` is parsed as a SentencePiece ``ModelProto`` (needs the
    ``sentencepiece`` package) and its own normalizer flags are used.

    Args:
        path: the tokenizer file.
        vocab_size: the checkpoint's vocabulary size (the number of tokens to read).

    Returns:
        The pieces (ids ``0..vocab_size-1``), scores and normalizer flags.

    Raises:
        ValueError: the file is truncated, has trailing bytes, invalid lengths/UTF-8/scores, a
            different vocabulary size, or not the llama2.c layout (ids 0..2 unk/BOS/EOS,
            3..258 the byte pieces ``<0x00>``..``<0xFF>``, then unique normal pieces).
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".model":
        return _read_tokenizer_model(path, raw, vocab_size)
    return _read_tokenizer_bin(path, raw, vocab_size)


def _bpe_merges(tok: Llama2cTokenizer) -> list[tuple[str, str]]:
    """All merges ``(left, right)`` whose concatenation is a normal piece, in SentencePiece order.

    SentencePiece BPE (``bpe_model.cc``) repeatedly merges the adjacent symbol pair whose
    concatenation is in the vocabulary with the highest score. HF BPE instead applies the
    lowest-ranked listed merge; listing every split ``left + right == piece`` with both halves
    normal pieces, sorted by (score descending, piece id ascending), reproduces that rule.
    """
    first_normal = _FIRST_BYTE_ID + _N_BYTE_PIECES
    normal = {p: i for i, p in enumerate(tok.pieces) if i >= first_normal}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-tok.scores[pid], pid, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(tok: Llama2cTokenizer):
    """Build a ``tokenizers.Tokenizer`` equivalent to SentencePiece encoding with ``tok``.

    Pipeline (the LLaMA-1/2 SentencePiece setup, as HF's ``LlamaConverter`` builds it):

    * normalizer: when ``remove_extra_whitespaces`` (SentencePiece's default, which
      llama2.c's ``train_vocab`` keeps), strip leading/trailing ASCII spaces and collapse runs
      of spaces to one, as SentencePiece's normalizer does (only U+0020 is affected); then,
      when ``add_dummy_prefix``, prepend "▁"; then replace " " with "▁". No pre-tokenizer, so
      BPE sees the whole text as one word, like SentencePiece.
    * model: ``BPE`` with ``byte_fallback=True``, ``unk_token="<unk>"``, ``fuse_unk=True``,
      vocab piece -> id and the merges from :func:`_bpe_merges`.
    * decoder: Replace("▁", " "), ByteFallback, Fuse, Strip(" ", left=1) when
      ``add_dummy_prefix``.
    * ``<unk>``, ``<s>``, ``</s>`` are added special tokens (ids 0, 1, 2); the post-processor
      prepends ``<s>`` (``add_special_tokens=False`` gives the bare SentencePiece ids).

    Args:
        tok: vocabulary from :func:`read_llama2c_tokenizer`.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {piece: i for i, piece in enumerate(tok.pieces)}
    model = BPE(
        vocab=vocab,
        merges=_bpe_merges(tok),
        unk_token=UNK,
        fuse_unk=True,
        byte_fallback=True,
        dropout=None,
    )
    tokenizer = Tokenizer(model)
    steps = []
    if tok.remove_extra_whitespaces:
        steps += [
            # Oniguruma: "^"/"$" would match at every line; \A/\z are the text ends.
            normalizers.Replace(Regex(r"\A +| +\z"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if tok.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE_SYMBOL))
    steps.append(normalizers.Replace(" ", SPACE_SYMBOL))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    dec = [decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if tok.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(dec)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, 1)],
    )
    return tokenizer


def tokenizer_config(seq_len: int) -> dict:
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False}
    special.update(single_word=False, special=True)
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): dict(special, content=t) for i, t in enumerate((UNK, BOS, EOS))
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": seq_len,
        "pad_token": None,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }
