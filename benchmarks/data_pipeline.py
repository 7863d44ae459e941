"""Throughput of the data pipeline's filter set (clean, exact dedup, MinHash dedup, Gopher/C4
heuristics) on the shared corpora, with datatrove run side by side in the same process.

    python benchmarks/data_pipeline.py            # progress on stderr, a table at the end
    python benchmarks/data_pipeline.py --json --quiet

Both read the same JSONL of raw documents (the corpora parsed once by deepwhale's readers, not
timed) and write the surviving documents as JSONL. deepwhale: one Beam pipeline on the
in-process runner. datatrove: its documented multi-step recipe with ``LocalPipelineExecutor``
(``workers=1``, in this process): FTFY -> exact-dedup signature / find / filter -> MinHash
signature / buckets / cluster / filter -> GopherRepetitionFilter + GopherQualityFilter.
datatrove's word tokenizers need nltk / spaCy models (downloads), so it is given the same
segmentation as ours (jieba for CJK text, whitespace otherwise) as a ``WordTokenizer``.
Documents/s and MB/s are input documents (and UTF-8 bytes) over wall time; ``ratio`` is
deepwhale's docs/s over datatrove's (> 1: deepwhale is faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "corpus"

# (relative path, format, extra InputSpec fields)
SOURCES = [
    ("zh/novels/hongloumeng.txt", "novel", {}),
    ("zh/novels/sanguoyanyi.txt", "novel", {}),
    ("zh/poetry/tangshi300.json", "poetry", {}),
    ("zh/poetry/songci300.json", "poetry", {}),
    ("zh/poetry/lunyu.json", "poetry", {}),
    ("mixed/cmn-eng/cmn.txt", "pairs", {"pairs_per_doc": 10}),
    ("en/tinyshakespeare/input.txt", "text", {"split": "block"}),
    ("en/tinystories/tinystories_sample.txt", "text", {"separator": "<|endoftext|>"}),
]


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[data_pipeline] {msg}", file=sys.stderr, flush=True)


def prepare(corpus: Path, work: Path) -> tuple[Path, int, int]:
    """Parse the corpora into one JSONL of raw documents; returns (path, docs, UTF-8 bytes)."""
    from deepwhale.data.readers import (
        decode,
        parse_novel,
        parse_pairs,
        parse_poetry,
        parse_text,
    )

    path = work / "input" / "docs.jsonl"
    path.parent.mkdir(parents=True)
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for rel, fmt, extra in SOURCES:
            text = decode((corpus / rel).read_bytes())
            if fmt == "novel":
                items = parse_novel(text)
            elif fmt == "poetry":
                items = parse_poetry(text, rel)
            elif fmt == "pairs":
                items = parse_pairs(text, extra["pairs_per_doc"])
            else:
                items = parse_text(text, extra.get("split", "line"), extra.get("separator"))
            for i, t in items:
                f.write(json.dumps({"id": f"{rel}#{i:07d}", "text": t}, ensure_ascii=False) + "\n")
                n += 1
                size += len(t.encode("utf-8"))
    return path, n, size


QUALITY = {"min_chars": 50, "min_words": 10}  # same thresholds given to datatrove's Gopher


def run_deepwhale(jsonl: Path, out: Path, workers: int, dask_address: str | None = None) -> dict:
    from deepwhale.data.config import parse_config
    from deepwhale.data.pipeline import run

    cfg = parse_config(
        {
            "input": {"path": str(jsonl), "format": "jsonl"},
            "output": str(out),
            "stages": [
                {"clean": {"ftfy": True, "nfkc": True}},
                "exact_dedup",
                {"minhash_dedup": {"threshold": 0.8, "num_perm": 112}},
                {"quality": QUALITY},
            ],
        }
    )
    extra = [f"--direct_num_workers={workers}"] if workers > 1 else []
    if workers > 1:
        extra.append("--direct_running_mode=multi_processing")
    if dask_address is not None:
        extra = ["--runner=DaskRunner", f"--dask_client_address={dask_address}"]
    t0 = time.perf_counter()
    report = run(cfg, extra_args=extra)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "docs_out": report["docs_out"], "stages": report["stages"]}


def _datatrove_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    from deepwhale.data.quality import cjk_fraction, words_of

    class JiebaOrWhitespace(WordTokenizer):
        """jieba for mostly-CJK text, whitespace otherwise: deepwhale's quality segmentation."""

        def word_tokenize(self, text: str) -> list[str]:
            return words_of(text, cjk_fraction(text) > 0.3)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[。！？.!?])\s*", text) if s]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, pos = [], 0
            for s in self.sent_tokenize(text):
                start = text.find(s, pos)
                spans.append((start, start + len(s)))
                pos = start + len(s)
            return spans

    return JiebaOrWhitespace("zh")


def run_datatrove(jsonl: Path, work: Path) -> dict:
    """The same filter set with datatrove; returns timings or {"error": why}."""
    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup.exact_dedup import (
            ExactDedupConfig,
            ExactDedupFilter,
            ExactDedupSignature,
            ExactFindDedups,
        )
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
        from datatrove.pipeline.formatters import FTFYFormatter
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import JsonlWriter
    except ImportError as e:
        return {"error": f"datatrove is not installed ({e}); pip install datatrove"}
    from loguru import logger

    logger.remove()  # datatrove logs every step at INFO to stderr
    tok = _datatrove_tokenizer()
    d = work / "datatrove"
    src = str(jsonl.parent)
    try:
        from datatrove.utils.hashing import HashConfig

        from deepwhale.data.dedup import normalize_for_dedup  # same key as ours

        # sha1: datatrove 0.10's xxhash path hands str to xxhash 3.x, which rejects it
        sha1 = HashConfig(precision=64, hash_fc="sha1")
        exact_cfg = ExactDedupConfig(
            content_getter=lambda doc: normalize_for_dedup(doc.text),
            hash_config=sha1,
        )
        mh_cfg = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5, hash_config=sha1)
    except ImportError as e:
        return {"error": f"datatrove cannot run: {e}"}

    def reader(folder):
        return JsonlReader(folder)

    def execute(steps, name, tasks=1):
        LocalPipelineExecutor(
            pipeline=steps, tasks=tasks, workers=1, logging_dir=str(d / "logs" / name)
        ).run()

    t0 = time.perf_counter()
    try:
        execute([reader(src), FTFYFormatter(), JsonlWriter(str(d / "clean"))], "clean")
        execute([reader(str(d / "clean")), ExactDedupSignature(str(d / "esig"), exact_cfg)], "es")
        execute([ExactFindDedups(str(d / "esig"), str(d / "edups"), exact_cfg)], "ef")
        execute(
            [
                reader(str(d / "clean")),
                ExactDedupFilter(str(d / "edups"), exact_cfg),
                JsonlWriter(str(d / "exact")),
            ],
            "exf",
        )
        execute(
            [
                reader(str(d / "exact")),
                MinhashDedupSignature(str(d / "msig"), config=mh_cfg, language=tok),
            ],
            "ms",
        )
        execute(  # one task per bucket, as datatrove requires; still one worker
            [MinhashDedupBuckets(str(d / "msig"), str(d / "mbuck"), config=mh_cfg)],
            "mb",
            tasks=mh_cfg.num_buckets,
        )
        execute([MinhashDedupCluster(str(d / "mbuck"), str(d / "mids"), config=mh_cfg)], "mc")
        execute(
            [
                reader(str(d / "exact")),
                MinhashDedupFilter(str(d / "mids")),
                GopherRepetitionFilter(language=tok),
                GopherQualityFilter(
                    min_doc_words=QUALITY["min_words"], min_stop_words=None, language=tok
                ),
                JsonlWriter(str(d / "final")),
            ],
            "mf",
        )
    except Exception as e:  # report ours even when datatrove breaks
        return {"error": f"datatrove failed: {type(e).__name__}: {e}"}
    wall = time.perf_counter() - t0
    kept = 0
    for f in (d / "final").glob("*.jsonl*"):
        import gzip

        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            kept += sum(1 for _ in fh)
    return {"wall_s": wall, "docs_out": kept}


def run_scaling(jsonl: Path, work: Path, n_docs: int, one: dict, quiet: bool) -> dict:
    """docs/s on 2 local Beam workers and on a Dask cluster of 2 worker processes, each with
    the ratio to the 1-process run ``one``; the shards' digests must match (same output)."""
    from deepwhale.data.dask_cluster import local_dask_cluster

    out: dict = {}
    log("running deepwhale on 2 local workers (multi_processing)", quiet)
    two = run_deepwhale(jsonl, work / "dw-2", 2)
    out["beam_2_local_workers"] = two
    log("starting a Dask scheduler + 2 worker processes on 127.0.0.1", quiet)
    root = Path(__file__).resolve().parents[1]
    try:
        with local_dask_cluster(2, pythonpath=root) as addr:
            out["dask_2_workers"] = run_deepwhale(jsonl, work / "dw-dask", 1, dask_address=addr)
    except RuntimeError as e:
        out["dask_2_workers"] = {"error": str(e)}
    for r in out.values():
        if "error" not in r:
            r.pop("stages", None)
            r["docs_per_s"] = n_docs / r["wall_s"]
            r["vs_1_process"] = r["docs_per_s"] / one["docs_per_s"]
            r["same_docs_out"] = r["docs_out"] == one["docs_out"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="shared corpus folder")
    ap.add_argument("--workers", type=int, default=1, help="Beam direct_num_workers")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="also run 2 local Beam workers and a Dask cluster of 2 worker processes",
    )
    args = ap.parse_args(argv)
    if args.quiet:
        logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    work = Path(tempfile.mkdtemp(prefix="dw-bench-"))
    try:
        log(f"parsing corpora under {args.corpus}", args.quiet)
        jsonl, n_docs, n_bytes = prepare(args.corpus, work)
        mb = n_bytes / 1e6
        log(f"{n_docs} documents, {mb:.2f} MB; running deepwhale (Beam FnApiRunner)", args.quiet)
        ours = run_deepwhale(jsonl, work / "deepwhale", args.workers)
        ours.update(docs_per_s=n_docs / ours["wall_s"], mb_per_s=mb / ours["wall_s"])
        log(f"deepwhale: {ours['wall_s']:.1f} s, {ours['docs_out']} docs kept", args.quiet)
        scaling = {}
        if args.scaling:
            scaling = run_scaling(jsonl, work, n_docs, ours, args.quiet)
        if args.skip_datatrove:
            theirs = {"error": "skipped (--skip-datatrove)"}
        else:
            log("running datatrove (LocalPipelineExecutor, workers=1)", args.quiet)
            import contextlib
            import io

            # datatrove's executor adds a loguru sink on sys.stderr for every run
            sink = io.StringIO() if args.quiet else sys.stderr
            with contextlib.redirect_stderr(sink):
                theirs = run_datatrove(jsonl, work)
        if "error" not in theirs:
            theirs.update(docs_per_s=n_docs / theirs["wall_s"], mb_per_s=mb / theirs["wall_s"])
            log(f"datatrove: {theirs['wall_s']:.1f} s, {theirs['docs_out']} kept", args.quiet)
        else:
            log(theirs["error"], args.quiet)
        result = {
            "docs": n_docs,
            "mb": round(mb, 3),
            "filters": ["clean(ftfy+nfkc)", "exact_dedup", "minhash_dedup", "gopher/c4"],
            "deepwhale": {k: v for k, v in ours.items() if k != "stages"},
            "datatrove": theirs,
            "ratio": (ours["docs_per_s"] / theirs["docs_per_s"]) if "error" not in theirs else None,
        }
        if scaling:
            result["scaling"] = scaling
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{'':12s}{'docs/s':>10s}{'MB/s':>8s}{'wall s':>8s}{'kept':>8s}")
            for name in ("deepwhale", "datatrove"):
                r = result[name]
                if "error" in r:
                    print(f"{name:12s} {r['error']}")
                else:
                    print(
                        f"{name:12s}{r['docs_per_s']:10.0f}{r['mb_per_s']:8.2f}"
                        f"{r['wall_s']:8.1f}{r['docs_out']:8d}"
                    )
            if result["ratio"] is not None:
                print(f"ratio (deepwhale / datatrove docs/s): {result['ratio']:.2f}")
            for name, r in scaling.items():
                if "error" in r:
                    print(f"{name:28s} {r['error']}")
                else:
                    print(f"{name:28s}{r['docs_per_s']:10.0f} docs/s  x{r['vs_1_process']:.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
