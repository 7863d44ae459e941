"""Domain dictionaries in the data pipeline (:mod:`deepwhale.dictionary`).

* :class:`TermMatcher`: every surface form of a dictionary in one Aho-Corasick automaton
  (``pyahocorasick``; Aho & Corasick 1975), matched leftmost-longest without overlaps. A form
  that starts (ends) with a Latin letter or digit only matches where the character before
  (after) it is not a Latin letter or digit, so ``MI`` is not found in ``MIT`` but is in
  ``患者MI``. ASCII letters match case-insensitively (``ignore_case``); other characters
  exactly.
* :class:`NormalizeTerms`: the ``normalize_terms`` stage's DoFn: rewrites every synonym to its
  entry's preferred form and counts ``rewrites`` (forms replaced) and ``docs_rewritten``.
* :func:`jieba_tokenizer`: a ``jieba.Tokenizer`` whose user dictionary holds the forms, so
  segmentation never splits a term (the ``quality`` stage's word counts).
* :func:`guard`: wraps an augmenter so it never touches a term. Each occurrence is masked by a
  private-use character (Unicode category Co: a separator to
  :func:`deepwhale.data.augment.split_words`, so no word-level strategy replaces, inserts a
  synonym of, swaps, deletes or perturbs it, and jieba never sees it) and put back afterwards.
  ``back_translation`` is not guarded: a translation model would not keep the placeholders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from deepwhale.data.metrics import CountingDoFn, StageCounters
from deepwhale.dictionary import Dictionary, load_dictionary

__all__ = [
    "NormalizeTerms",
    "TermMatcher",
    "guard",
    "guard_all",
    "jieba_tokenizer",
    "matcher_for",
]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_PUA_FIRST, _PUA_LAST = 0xE000, 0xF8FF
#: strategies :func:`guard` leaves alone (their output would not keep the placeholders)
UNGUARDED = frozenset({"back_translation"})


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


@dataclass(frozen=True)
class Match:
    """One occurrence: ``text[start:end]`` is the form, ``target`` what it maps to."""

    start: int
    end: int
    target: str


class TermMatcher:
    """Find dictionary forms in text (see the module docstring).

    Args:
        mapping: ``{form: target}``; a form mapped to itself is only found (protected), a form
            mapped to another string is rewritten by :meth:`rewrite`.
        ignore_case: ASCII letters match case-insensitively.

    Raises:
        ImportError: pyahocorasick is not installed (``pip install "deepwhale[data]"``).
    """

    def __init__(self, mapping: dict[str, str], ignore_case: bool = True):
        import ahocorasick

        self.ignore_case = ignore_case
        self.automaton = ahocorasick.Automaton()
        self.size = 0
        for form, target in mapping.items():
            if not form:
                continue
            key = self._fold(form)
            self.automaton.add_word(key, (len(key), target, _latin(key[0]), _latin(key[-1])))
            self.size += 1
        if self.size:
            self.automaton.make_automaton()

    def _fold(self, text: str) -> str:
        return text.translate(_ASCII_LOWER) if self.ignore_case else text

    def find(self, text: str) -> list[Match]:
        """Non-overlapping occurrences, leftmost first and at one start the longest.

        Returns ``[Match]`` in text order; offsets index ``text`` (folding keeps lengths).
        """
        if not self.size or not text:
            return []
        cands = []
        n = len(text)
        for end, (length, target, latin_start, latin_end) in self.automaton.iter(self._fold(text)):
            start = end - length + 1
            if latin_start and start > 0 and _latin(text[start - 1]):
                continue
            if latin_end and end + 1 < n and _latin(text[end + 1]):
                continue
            cands.append((start, -length, target))
        cands.sort()
        out, pos = [], 0
        for start, neg, target in cands:
            if start >= pos:
                out.append(Match(start, start - neg, target))
                pos = start - neg
        return out

    def rewrite(self, text: str) -> tuple[str, int]:
        """``text`` with every form replaced by its target; ``(new text, forms replaced)``."""
        parts, pos, n = [], 0, 0
        for m in self.find(text):
            if text[m.start : m.end] == m.target:
                continue
            parts += [text[pos : m.start], m.target]
            pos = m.end
            n += 1
        if not n:
            return text, 0
        parts.append(text[pos:])
        return "".join(parts), n


def matcher_for(
    d: Dictionary, rewrite: bool = True, categories: Iterable[str] | None = None, **kw
) -> TermMatcher:
    """A :class:`TermMatcher` of dictionary ``d``.

    Args:
        d: the dictionary.
        rewrite: map synonyms to the preferred form (else every form to itself: protect only).
        categories: only entries of these categories (None = all).
        **kw: :class:`TermMatcher` options (``ignore_case``).
    """
    keep = None if categories is None else set(categories)
    mapping: dict[str, str] = {}
    for e in d.entries:
        if keep is not None and e.category not in keep:
            continue
        for f in e.forms:
            mapping.setdefault(f, e.preferred if rewrite else f)
    return TermMatcher(mapping, **kw)


def jieba_tokenizer(forms: Iterable[str]):
    """A new ``jieba.Tokenizer`` with ``forms`` in its user dictionary (``add_word`` with the
    frequency jieba suggests to keep each whole); forms with spaces are left out (jieba never
    joins across a space). The default jieba dictionary stays untouched."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    tok = jieba.Tokenizer()
    tok.initialize()
    for f in forms:
        if f and not any(c.isspace() for c in f):
            tok.add_word(f)
    return tok


def _mask(text: str, matcher: TermMatcher) -> tuple[str, dict[str, str]]:
    used = set(text)
    chars = (chr(c) for c in range(_PUA_FIRST, _PUA_LAST + 1) if chr(c) not in used)
    parts, pos, restore = [], 0, {}
    for m, ch in zip(matcher.find(text), chars, strict=False):
        parts += [text[pos : m.start], ch]
        restore[ch] = text[m.start : m.end]
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts), restore


def guard(augmenter: Callable[[str, int], str], matcher: TermMatcher) -> Callable[[str, int], str]:
    """``augmenter`` that leaves every occurrence of ``matcher``'s forms as it was (see the
    module docstring). Returns a callable ``(text, seed) -> text``."""

    def guarded(text: str, seed: int) -> str:
        masked, restore = _mask(text, matcher)
        if not restore:
            return augmenter(text, seed)
        out = augmenter(masked, seed)
        return "".join(restore.get(c, c) for c in out)

    return guarded


def guard_all(augs: list[tuple[str, Callable]], path: str) -> list[tuple[str, Callable]]:
    """``[(strategy name, augmenter)]`` with each augmenter :func:`guard` ed by the dictionary
    at ``path`` (protect only, every form; strategies in :data:`UNGUARDED` are kept as they
    are).

    Raises:
        deepwhale.dictionary.DictionaryError: the dictionary is unreadable or has errors.
    """
    matcher = matcher_for(load_dictionary(path), rewrite=False)
    return [(n, a if n in UNGUARDED else guard(a, matcher)) for n, a in augs]


class NormalizeTerms(CountingDoFn):
    """Beam DoFn of the ``normalize_terms`` stage: rewrite synonyms to the preferred form.

    Counters (``deepwhale.data.<stage>``): ``in``, ``kept``, ``rewrites`` (forms replaced) and
    ``docs_rewritten``.

    Args:
        path: the dictionary file (checked with :func:`deepwhale.dictionary.load_dictionary`).
        categories: only entries of these categories (None = all).
        ignore_case: ASCII letters match case-insensitively.
    """

    def __init__(
        self,
        path: str,
        categories: list[str] | None = None,
        ignore_case: bool = True,
        stage: str = "normalize_terms",
    ):
        self.path = path
        self.categories = categories
        self.ignore_case = ignore_case
        self.counters = StageCounters(stage)
        self._matcher: TermMatcher | None = None

    def setup(self):
        d = load_dictionary(self.path)
        self._matcher = matcher_for(d, True, self.categories, ignore_case=self.ignore_case)

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        text, n = self._matcher.rewrite(doc["text"])
        self.counters.kept.inc()
        if n:
            self.counters.count("rewrites", n)
            self.counters.count("docs_rewritten")
            doc = {**doc, "text": text}
        yield doc
