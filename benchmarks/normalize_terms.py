"""Throughput of the ``normalize_terms`` stage's matcher (deepwhale/data/terms.py, Aho-Corasick
via pyahocorasick) against a compiled ``re`` alternation with the same semantics, side by side
in one run, at 100 and 10,000 terms.

    python benchmarks/normalize_terms.py              # progress on stderr, a table at the end
    python benchmarks/normalize_terms.py --json --quiet

Documents: the lines of 红楼梦 (CRLF stripped) and the English and Chinese sides of the Tatoeba
pairs in ../shared/data/corpus, shuffled with a fixed seed. Terms: real words, half Chinese
(jieba's own dictionary, 2-4 characters, the most frequent first, skipping the most common
ones) and half English (words of the English sentences, 4+ letters), each mapped to a preferred
form ``<word>_P``. The baseline is one ``re.compile`` of every form, longest first (so at one
start the longest form wins, as in ours), with ``(?<![A-Za-z0-9])`` / ``(?![A-Za-z0-9])``
around Latin forms and ``re.IGNORECASE | re.ASCII`` (our ASCII case folding), rewritten with
``sub``. Both must produce the same text on every document timed (``agree``). docs/s are
documents rewritten over wall time (build times not included, reported apart); ``ratio`` is
ours over the regex's (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"
_LATIN = re.compile(r"[A-Za-z0-9]")


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[normalize_terms] {msg}", file=sys.stderr, flush=True)


def documents(corpus: Path, n: int, seed: int = 0) -> list[str]:
    """Up to ``n`` real lines (Chinese novel, English and Chinese sentences), shuffled."""
    novel = (corpus / "zh/novels/hongloumeng.txt").read_text(encoding="utf-8")
    lines = [x.strip() for x in novel.splitlines() if x.strip()]
    pairs = (corpus / "mixed/cmn-eng/cmn.txt").read_text(encoding="utf-8-sig").splitlines()
    for row in pairs:
        lines += [c for c in row.split("\t")[:2] if c.strip()]
    random.Random(seed).shuffle(lines)
    return lines[:n]


def terms(corpus: Path, n: int) -> dict[str, str]:
    """``n`` real words (half Chinese from jieba's dictionary, half English from the Tatoeba
    sentences) -> preferred form ``<word>_P``."""
    import jieba

    zh = []
    with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
        for line in f:
            word, freq = line.split()[:2]
            if 2 <= len(word) <= 4:
                zh.append((int(freq), word))
    zh.sort(reverse=True)
    zh_words = [w for _, w in zh[200:]]  # skip the commonest function words
    pairs = (corpus / "mixed/cmn-eng/cmn.txt").read_text(encoding="utf-8-sig").splitlines()
    counts: dict[str, int] = {}
    for row in pairs:
        for w in re.findall(r"[a-z]{4,}", row.split("\t")[0].lower()):
            counts[w] = counts.get(w, 0) + 1
    en_words = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])[50:]]
    half = n // 2
    words = zh_words[:half] + en_words[: n - half]
    if len(words) < n:
        words += zh_words[half : half + n - len(words)]
    return {w: f"{w}_P" for w in words}


def regex_baseline(mapping: dict[str, str]):
    """``text -> (text, rewrites)`` with one compiled alternation (longest form first)."""
    parts = []
    for form in sorted(mapping, key=len, reverse=True):
        p = re.escape(form)
        if _LATIN.match(form[0]):
            p = r"(?<![A-Za-z0-9])" + p
        if _LATIN.match(form[-1]):
            p += r"(?![A-Za-z0-9])"
        parts.append(p)
    pattern = re.compile("|".join(parts), re.IGNORECASE | re.ASCII)
    folded = {k.lower(): v for k, v in mapping.items()}

    def rewrite(text: str) -> tuple[str, int]:
        n = 0

        def repl(m: re.Match) -> str:
            nonlocal n
            target = folded[m.group().lower()]
            if m.group() != target:
                n += 1
                return target
            return m.group()

        return pattern.sub(repl, text), n

    return rewrite


def measure(fn, docs: list[str], budget_s: float, progress) -> tuple[float, list]:
    """docs/s of ``fn`` over ``docs`` in order, stopping after ``budget_s`` seconds; returns
    ``(docs/s, outputs of the documents done)``."""
    out = []
    t0 = time.perf_counter()
    for i, d in enumerate(docs):
        out.append(fn(d))
        if i % 256 == 0:
            progress(i)
            if time.perf_counter() - t0 > budget_s:
                break
    return len(out) / (time.perf_counter() - t0), out


def run(corpus: Path, sizes: list[int], n_docs: int, budget_s: float, quiet: bool) -> dict:
    from deepwhale.data.terms import TermMatcher

    docs = documents(corpus, n_docs)
    rows = []
    for size in sizes:
        mapping = terms(corpus, size)
        t0 = time.perf_counter()
        ours = TermMatcher(mapping)
        build_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = regex_baseline(mapping)
        build_re = time.perf_counter() - t0

        def tick(i: int, who: str, size: int = size) -> None:
            if not quiet and i % 8192 == 0:
                log(f"{size:,} terms, {who}: {i:,} docs", quiet)

        ours_rate, ours_out = measure(ours.rewrite, docs, budget_s, lambda i: tick(i, "ours"))
        re_rate, re_out = measure(theirs, docs, budget_s, lambda i: tick(i, "regex"))
        k = min(len(ours_out), len(re_out))
        rows.append(
            {
                "terms": len(mapping),
                "docs_ours": len(ours_out),
                "docs_regex": len(re_out),
                "ours_docs_per_s": round(ours_rate, 1),
                "regex_docs_per_s": round(re_rate, 1),
                "ratio": round(ours_rate / re_rate, 2),
                "build_ours_s": round(build_ours, 4),
                "build_regex_s": round(build_re, 4),
                "rewrites": sum(n for _, n in ours_out[:k]),
                "agree": ours_out[:k] == re_out[:k],
                "agree_docs": k,
            }
        )
        log(
            f"{size:,} terms: ours {ours_rate:,.0f} docs/s, regex {re_rate:,.0f} docs/s "
            f"(x{ours_rate / re_rate:.2f})",
            quiet,
        )
    chars = sum(map(len, docs)) / max(1, len(docs))
    return {"docs": len(docs), "chars_per_doc": round(chars, 1), "budget_s": budget_s, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="shared corpus folder")
    ap.add_argument("--terms", type=int, nargs="+", default=[100, 10_000], help="term counts")
    ap.add_argument("--docs", type=int, default=50_000, help="documents at most")
    ap.add_argument("--seconds", type=float, default=5.0, help="time budget per measurement")
    a = ap.parse_args()
    if a.quiet:
        import logging

        logging.getLogger().setLevel(logging.ERROR)  # Beam's import-time warnings
    if not (a.corpus / "zh/novels/hongloumeng.txt").exists():
        sys.exit(f"corpus not found at {a.corpus}")
    result = run(a.corpus, a.terms, a.docs, a.seconds, a.quiet)
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'terms':>7} {'ours docs/s':>12} {'regex docs/s':>13} {'ratio':>7} {'agree':>6}")
    for r in result["rows"]:
        print(
            f"{r['terms']:>7,} {r['ours_docs_per_s']:>12,.0f} {r['regex_docs_per_s']:>13,.0f} "
            f"{r['ratio']:>7.2f} {str(r['agree']):>6}"
        )


if __name__ == "__main__":
    main()
