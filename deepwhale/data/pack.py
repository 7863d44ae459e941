"""Tokenize and pack into training shards, as Beam transforms over ``deepwhale.data.shards``.

Shard assignment is deterministic: a document goes to shard
``int(sha1(doc id)[:8], 16) % num_shards``; within a shard, documents are packed in id order
(``shards.pack``: ids + EOS, cut into ``seq_len`` rows, the tail shorter than a row is dropped,
so at most ``seq_len`` tokens per shard are lost). The same input and config therefore always
give the same bytes, and a re-run skips any shard that ``shards.shard_complete`` reports done
(record present, size and sha256 match): its documents are not even tokenized; a shard that
fails the check is tokenized and written again. The manifest is written last, from the records of all
shards, so it only ever lists complete shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam

from deepwhale.data import shards
from deepwhale.data.config import PipelineConfigError, TokenizeParams
from deepwhale.data.metrics import CountingDoFn, StageCounters

log = logging.getLogger(__name__)


def shard_of(doc_id: str, num_shards: int) -> int:
    """Shard index of a document: ``int(sha1(id)[:8], 16) % num_shards``."""
    return int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16) % num_shards


def tokenizer_folder(path: str | None) -> Path:
    """The tokenizer folder: a path, or a bundled model's name (``deepwhale-demo``,
    ``stories260K``); default the bundled stories260K.

    Raises:
        PipelineConfigError: no ``tokenizer.json`` in it.
    """
    from deepwhale.checkpoint.hub import DEFAULT_MODEL, bundled

    folder = Path(path) if path else DEFAULT_MODEL
    if path and not folder.exists() and bundled(path) is not None:
        folder = bundled(path)
    if not (folder / "tokenizer.json").is_file():
        raise PipelineConfigError(f"tokenize.tokenizer: no tokenizer.json in {folder}")
    return folder


def tokenizer_info(path: str | None) -> tuple[int, int]:
    """``(vocab_size, eos_id)`` of the tokenizer.

    Raises:
        PipelineConfigError: the tokenizer has no EOS token.
    """
    from deepwhale.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_folder(path))
    if tok.eos_token_id is None:
        raise PipelineConfigError(f"tokenize.tokenizer {path!r} has no EOS token to separate docs")
    return tok.vocab_size, tok.eos_token_id


class _Tokenize(CountingDoFn):
    """doc -> ``(shard, (id, token ids))``; documents of complete shards are not tokenized."""

    def __init__(self, p: TokenizeParams, out_dir: str, stage: str):
        self.p, self.out_dir = p, out_dir
        self.counters = StageCounters(stage)
        self._tok = None
        self._complete: dict[int, bool] = {}

    def setup(self):
        from deepwhale.tokenizer import Tokenizer

        self._tok = Tokenizer.from_pretrained(tokenizer_folder(self.p.tokenizer))

    def process(self, doc: dict):
        self.counters.seen.inc()
        k = shard_of(doc["id"], self.p.num_shards)
        if k not in self._complete:
            self._complete[k] = shards.shard_complete(self.out_dir, k, verify=True) is not None
        if self._complete[k]:
            self.counters.kept.inc()
            yield k, (doc["id"], None)
            return
        ids = self._tok.encode(doc["text"], add_special_tokens=False)
        if not ids:
            self.counters.drop("no_tokens")
            return
        self.counters.kept.inc()
        yield k, (doc["id"], ids)


class _WriteShard(CountingDoFn):
    """``(shard, [(id, ids)])`` -> ``(shard, record)``, writing the shard unless complete."""

    def __init__(self, p: TokenizeParams, out_dir: str, vocab_size: int, eos_id: int):
        self.p, self.out_dir = p, out_dir
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.counters = StageCounters("shards")

    def process(self, item) -> Iterator[tuple[int, dict]]:
        k, docs = item
        record = shards.shard_complete(self.out_dir, k, verify=True)
        if record is not None:
            self.counters.drop("already_complete")  # counted as skipped, not lost
            yield k, {**record, "docs": sum(1 for _ in docs)}
            return
        if shards.shard_complete(self.out_dir, k) is not None:  # right size, wrong sha256
            log.warning("%s: shard %d fails its sha256 check; rewriting it", self.out_dir, k)
            self.counters.count("rewritten_corrupt")
        docs = sorted(docs, key=lambda d: d[0])
        rows = shards.pack((ids for _, ids in docs), self.p.seq_len, self.eos_id)
        record = shards.write_shard(self.out_dir, k, rows, self.vocab_size)
        self.counters.kept.inc()
        yield k, {**record, "docs": len(docs)}


def _write_manifest(records, out_dir: str, p: TokenizeParams, vocab: int, eos: int, extra):
    records = [r for _, r in sorted(records, key=lambda kr: kr[0])]
    clean = [{k: v for k, v in r.items() if k != "docs"} for r in records]
    shards.write_manifest(
        out_dir,
        clean,
        seq_len=p.seq_len,
        vocab_size=vocab,
        eos_id=eos,
        extra={**extra, "docs": sum(r["docs"] for r in records)},
    )
    return len(records)


class TokenizeAndPack(beam.PTransform):
    """Documents -> shard files + ``manifest.json`` in ``out_dir``.

    Counters: ``deepwhale.data.tokenize`` (``in``/``kept``/``dropped.no_tokens``) and
    ``deepwhale.data.shards`` (``kept`` = shards written, ``dropped.already_complete`` = shards
    skipped on a re-run after their sha256 checked out, ``rewritten_corrupt`` = shards of the
    right size whose sha256 did not match, written again). The manifest's ``tokenizer`` is the
    absolute path of the tokenizer folder, so training from another directory finds it.

    Raises (at construction):
        PipelineConfigError: no ``tokenizer.json`` or no EOS token.
    """

    def __init__(self, params: TokenizeParams, out_dir: str, stage: str = "tokenize"):
        super().__init__()
        self.params = params
        self.out_dir = out_dir
        self.stage = stage
        self.vocab_size, self.eos_id = tokenizer_info(params.tokenizer)

    def expand(self, docs):
        p = self.params
        extra = {
            "tokenizer": str(tokenizer_folder(p.tokenizer).resolve()),
            "num_shards": p.num_shards,
        }
        return (
            docs
            | "Tokenize" >> beam.ParDo(_Tokenize(p, self.out_dir, self.stage))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards"
            >> beam.ParDo(_WriteShard(p, self.out_dir, self.vocab_size, self.eos_id))
            | "AllRecords" >> beam.combiners.ToList()
            | "Manifest"
            >> beam.Map(_write_manifest, self.out_dir, p, self.vocab_size, self.eos_id, extra)
        )
