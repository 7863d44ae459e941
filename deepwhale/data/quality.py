"""Gopher / C4 quality heuristics that also work for Chinese, Japanese and Korean.

Gopher (Rae et al. 2021, "Scaling Language Models", App. A.1.1 and Table A1) and C4 (Raffel et al.
2020, §2.2) count *words* by whitespace, which fails for CJK. Here a document whose characters are
more than 30% CJK is segmented with jieba, and punctuation-only tokens are not words; the mean
word length bounds are separate for CJK (a jieba word is 1-4 characters) and Latin text
(Gopher: 3-10). Ratios are over non-whitespace characters.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator

from deepwhale.data.config import QualityParams
from deepwhale.data.metrics import CountingDoFn, StageCounters

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_DIGIT = re.compile(r"\d")
_WS = re.compile(r"\s+")
_HAS_LETTER = re.compile(r"[^\W\d_]")
_PUNCT_ONLY = re.compile(r"^[\W_]+$")


def _symbol_table() -> dict[int, None]:
    # Every code point of a Unicode symbol category (Sm, Sc, Sk, So) -> deleted by translate;
    # len(text) - len(translated) counts symbols in C speed. '#' is punctuation (Po) in Unicode
    # but a symbol for Gopher, so it is added.
    table = {
        cp: None
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp)).startswith("S")
    }
    table[ord("#")] = None
    return table


_SYMBOLS: dict[int, None] | None = None


def cjk_fraction(text: str) -> float:
    """Share of non-whitespace characters that are CJK ideographs, kana or hangul (0..1)."""
    chars = len(text) - sum(map(len, _WS.findall(text)))
    return len(_CJK.findall(text)) / chars if chars else 0.0


def words_of(text: str, cjk: bool, segmenter=None) -> list[str]:
    """Words: jieba segments without punctuation-only tokens (CJK), else whitespace splits.

    ``segmenter``: anything with jieba's ``lcut(text, HMM=False)`` (a
    :class:`deepwhale.data.segment.Segmenter`, rjieba or jieba, with a domain dictionary's
    terms as user words; or a ``jieba.Tokenizer``); default: jieba's global one."""
    if cjk:
        if segmenter is None:
            import jieba as segmenter

        return [
            w for w in segmenter.lcut(text, HMM=False) if w.strip() and not _PUNCT_ONLY.match(w)
        ]
    return text.split()


def _ngram_stats(words: list[str], n: int) -> tuple[float, float]:
    """(share of word characters in the most frequent n-gram, share in any repeated n-gram)."""
    total = sum(map(len, words))
    if len(words) < n or total == 0:
        return 0.0, 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top, top_count = counts.most_common(1)[0]
    top_frac = top_count * sum(map(len, top)) / total if top_count > 1 else 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    dup_frac = sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total
    return top_frac, dup_frac


def quality_reason(text: str, p: QualityParams, segmenter=None) -> str | None:
    """The first heuristic ``text`` fails, or None when it passes them all (``segmenter``: see
    :func:`words_of`).

    Reasons (in the order checked): ``too_short``, ``too_long``, ``lorem_ipsum``,
    ``symbol_ratio``, ``digit_ratio``, ``dup_lines``, ``dup_line_chars``, ``ellipsis_lines``,
    ``too_few_words``, ``too_many_words``, ``mean_word_len``, ``alpha_words``, ``top_2gram``,
    ``dup_5gram``. Thresholds: :class:`~deepwhale.data.config.QualityParams` (Gopher Table A1
    defaults where Gopher has one; C4 for lorem ipsum).
    """
    global _SYMBOLS
    n = len(text)
    if n < p.min_chars:
        return "too_short"
    if n > p.max_chars:
        return "too_long"
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    chars = n - sum(map(len, _WS.findall(text)))
    if chars == 0:
        return "too_short"
    if _SYMBOLS is None:
        _SYMBOLS = _symbol_table()
    if (n - len(text.translate(_SYMBOLS))) / chars > p.max_symbol_ratio:
        return "symbol_ratio"
    if len(_DIGIT.findall(text)) / chars > p.max_digit_ratio:
        return "digit_ratio"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    if lines and dup_lines / len(lines) > p.max_dup_line_frac:
        return "dup_lines"
    if dup_chars / chars > p.max_dup_line_char_frac:
        return "dup_line_chars"
    if (
        lines
        and sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > p.max_ellipsis_line_frac
    ):
        return "ellipsis_lines"
    cjk = cjk_fraction(text) > 0.3
    words = words_of(text, cjk, segmenter)
    if len(words) < p.min_words:
        return "too_few_words"
    if len(words) > p.max_words:
        return "too_many_words"
    mean = sum(map(len, words)) / len(words)
    lo, hi = (
        (p.cjk_min_mean_word_len, p.cjk_max_mean_word_len)
        if cjk
        else (p.min_mean_word_len, p.max_mean_word_len)
    )
    if not lo <= mean <= hi:
        return "mean_word_len"
    if sum(1 for w in words if _HAS_LETTER.search(w)) / len(words) < p.min_alpha_word_frac:
        return "alpha_words"
    top2, _ = _ngram_stats(words, 2)
    if top2 > p.max_top_ngram_frac:
        return "top_2gram"
    _, dup5 = _ngram_stats(words, 5)
    if dup5 > p.max_dup_ngram_frac:
        return "dup_5gram"
    return None


class QualityFilter(CountingDoFn):
    """Beam DoFn: keep documents that pass :func:`quality_reason`; count drops by reason under
    ``deepwhale.data.quality``. With ``dictionary`` (a file for :mod:`deepwhale.dictionary`),
    the segmenter (:class:`deepwhale.data.segment.Segmenter`: rjieba where installed, else
    jieba; the same words) has the dictionary's forms as user words, so no term is split.
    """

    def __init__(
        self, params: QualityParams, stage: str = "quality", dictionary: str | None = None
    ):
        self.params = params
        self.counters = StageCounters(stage)
        self.dictionary = dictionary
        self._segmenter = None

    def setup(self):
        from deepwhale.data.segment import Segmenter

        forms = ()
        if self.dictionary:
            from deepwhale.dictionary import load_dictionary

            forms = load_dictionary(self.dictionary).forms()
        self._segmenter = Segmenter(forms)

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        reason = quality_reason(doc["text"], self.params, self._segmenter)
        if reason is not None:
            self.counters.drop(reason)
            return
        self.counters.kept.inc()
        yield doc
