"""Tokenize and pack in streaming mode: complete shards per window, written as documents arrive.

Batch mode (:class:`deepwhale.data.pack.TokenizeAndPack`) groups the whole collection by shard.
A stream has no end. The in-process runners also fire a windowed ``GroupByKey`` only when input
ends, so here each bundle (in practice, the documents of one newly seen file) becomes one shard
of its window's folder, ``shards/window-<start>-<end>/``:

1. The bundle's documents of one window are sorted by id, tokenized, and packed into rows of
   ``seq_len`` tokens, each document followed by EOS (:func:`deepwhale.data.shards.pack`). The
   tail shorter than a row is dropped, so each shard loses at most ``seq_len`` tokens. It is
   counted as ``dropped.tail_tokens``.
2. The shard is named by the sha1 of its document ids (``shard-<int of 8 hex digits>``), so a
   retried bundle writes the same shard again, and a complete one (record present, size and
   sha256 match) is not rewritten.
3. Under an exclusive lock on the window folder, ``manifest.json`` is rebuilt from every complete
   shard record there and replaced atomically. It has the batch manifest's format
   (:func:`deepwhale.data.shards.write_manifest`, plus ``window``), so a window folder is a
   training dataset as soon as its first shard lands (:class:`~deepwhale.data.shards.PackedDataset`),
   and it only ever lists complete shards.

Counters: ``deepwhale.data.tokenize`` (``in``, ``kept``, ``dropped.no_tokens``,
``dropped.tail_tokens``) and ``deepwhale.data.shards`` (``kept`` = shards written,
``dropped.already_complete``, ``dropped.no_full_row`` = bundles too short for one row).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import apache_beam as beam

from deepwhale.atomic import write_json
from deepwhale.data import shards
from deepwhale.data.config import TokenizeParams
from deepwhale.data.metrics import CountingDoFn, StageCounters
from deepwhale.data.pack import tokenizer_folder, tokenizer_info


def window_folder(out_dir: str | Path, window) -> Path:
    """The folder of a Beam window's output: ``window-<start>-<end>`` (epoch seconds)."""
    return Path(out_dir) / f"window-{int(window.start):012d}-{int(window.end):012d}"


def rebuild_manifest(folder: Path, p: TokenizeParams, vocab: int, eos: int, extra: dict) -> dict:
    """Rewrite ``folder/manifest.json`` from the folder's complete shard records (in file name
    order), under an exclusive ``fcntl`` lock on ``folder/.manifest.lock`` so that concurrent
    workers never lose each other's shards; returns the manifest."""
    with open(folder / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = []
            for path in sorted(folder.glob("shard-*.json")):
                index = int(path.stem.removeprefix("shard-"))
                record = shards.shard_complete(folder, index)
                if record is not None:
                    records.append(record)
            clean = [{k: v for k, v in r.items() if k != "docs"} for r in records]
            return shards.write_manifest(
                folder,
                clean,
                seq_len=p.seq_len,
                vocab_size=vocab,
                eos_id=eos,
                extra={**extra, "docs": sum(r.get("docs", 0) for r in records)},
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _PackWindowParts(CountingDoFn):
    """Buffer a bundle's documents by window; at the bundle's end write one shard per window
    and rebuild that window's manifest (see the module docstring)."""

    def __init__(self, p: TokenizeParams, out_dir: str, stage: str):
        self.p, self.out_dir = p, out_dir
        self.counters = StageCounters(stage)
        self.shard_counters = StageCounters("shards")
        self.vocab_size, self.eos_id = tokenizer_info(p.tokenizer)
        self.extra = {"tokenizer": str(tokenizer_folder(p.tokenizer).resolve())}
        self._tok = None
        self._buf: dict = {}

    def setup(self):
        from deepwhale.tokenizer import Tokenizer

        self._tok = Tokenizer.from_pretrained(tokenizer_folder(self.p.tokenizer))

    def start_bundle(self):
        super().start_bundle()
        self._buf = {}

    # no ``-> None`` (Beam 2.78 reads it as the output type); this DoFn only buffers
    def process(self, doc: dict, window=beam.DoFn.WindowParam):
        self._buf.setdefault(window, []).append(doc)

    def finish_bundle(self) -> None:
        for window, docs in self._buf.items():
            self._write(window, sorted(docs, key=lambda d: d["id"]))
        self._buf = {}
        super().finish_bundle()

    def _write(self, window, docs: list[dict]) -> None:
        folder = window_folder(self.out_dir, window)
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1("\n".join(d["id"] for d in docs).encode()).hexdigest()
        index = int(digest[:8], 16)
        self.counters.seen.inc(len(docs))
        if shards.shard_complete(folder, index, verify=True) is not None:
            self.counters.kept.inc(len(docs))
            self.shard_counters.drop("already_complete")
            return
        encoded = []
        for d in docs:
            ids = self._tok.encode(d["text"], add_special_tokens=False)
            if ids:
                encoded.append(ids)
            else:
                self.counters.drop("no_tokens")
        self.counters.kept.inc(len(encoded))
        rows = shards.pack(encoded, self.p.seq_len, self.eos_id)
        total = sum(len(ids) + 1 for ids in encoded)
        self.counters.drop("tail_tokens", total - rows.size)
        if rows.shape[0] == 0:
            self.shard_counters.drop("no_full_row")
            return
        record = shards.write_shard(folder, index, rows, self.vocab_size)
        record = {**record, "docs": len(encoded)}
        write_json(folder / f"{shards.shard_name(index)}.json", record)
        self.shard_counters.kept.inc()
        window_extra = {**self.extra, "window": [int(window.start), int(window.end)]}
        rebuild_manifest(folder, self.p, self.vocab_size, self.eos_id, window_extra)


class StreamingTokenizeAndPack(beam.PTransform):
    """Windowed documents -> per-window shard folders under ``out_dir`` (see the module
    docstring). Outputs nothing; the shards and manifests are the product.

    Raises (at construction):
        PipelineConfigError: no ``tokenizer.json`` or no EOS token.
    """

    def __init__(self, params: TokenizeParams, out_dir: str, stage: str = "tokenize"):
        super().__init__()
        self.params, self.out_dir, self.stage = params, out_dir, stage
        tokenizer_info(params.tokenizer)  # fail now, not on a worker

    def expand(self, docs):
        return docs | "PackWindows" >> beam.ParDo(
            _PackWindowParts(self.params, self.out_dir, self.stage)
        )


def streaming_shard_totals(shard_dir: Path) -> dict:
    """``shards`` of ``report.json`` for a streaming run: the totals over the window folders'
    manifests (``rows``, ``tokens``, ``docs``, ``files``, ``windows``), and ``seq_len``."""
    totals = {"rows": 0, "tokens": 0, "docs": 0, "files": 0, "windows": 0, "seq_len": None}
    for path in sorted(shard_dir.glob("window-*/manifest.json")):
        m = json.loads(path.read_text())
        totals["windows"] += 1
        totals["files"] += len(m["shards"])
        for key in ("rows", "tokens", "docs"):
            totals[key] += m[key]
        totals["seq_len"] = m["seq_len"]
    return totals
