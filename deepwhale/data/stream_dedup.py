"""Near-duplicate removal in streaming mode: each document against the signatures seen so far.

Batch mode (:class:`deepwhale.data.dedup.MinHashDedup`) sees the whole collection and keeps the
smallest id of each cluster. A stream never ends, so here a document is checked when it arrives
against every earlier survivor, and the first one seen wins. The earlier signatures live in a
persistent LSH index, an SQLite file in the output folder (``minhash_index.sqlite``). It is shared
by every worker process and it survives a restart: a near-duplicate that arrives after a restart
is still dropped.

For each document:

1. Compute the MinHash signature and its LSH band keys, the same ones batch mode uses
   (:class:`~deepwhale.data.dedup.MinHasher`, :func:`~deepwhale.data.dedup.band_keys`).
2. In one ``BEGIN IMMEDIATE`` transaction, so that two workers cannot both keep a pair:
   - find the indexed documents that share a band;
   - take the first of them (in id order) whose estimated Jaccard similarity reaches the
     threshold, and drop the new document as its duplicate;
   - if none does, add the new document's signature and band keys, and keep it.

A document whose id is already in the index was delivered before. Within one run (a retried
bundle) it is kept again, so a retry gives the same answer. From an earlier run (a restart reads
the watched files again, since the watcher's seen-files state is Beam state that a restart loses)
it is dropped as ``seen_in_earlier_run``: it was written out before the restart.
The index records its MinHash parameters. Opening it with different ones raises
:class:`IndexMismatchError`: signatures made with other parameters cannot be compared.

References: Broder (1997) MinHash; Leskovec, Rajaraman and Ullman, *Mining of Massive Datasets*
§3.4 (LSH banding); the bands and rows come from datasketch's ``MinHashLSH``, as in batch mode.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import apache_beam as beam
import numpy as np

from deepwhale.data.config import MinHashParams, PipelineConfigError
from deepwhale.data.dedup import MinHasher, band_keys, lsh_bands
from deepwhale.data.metrics import CountingDoFn, StageCounters

#: the index file's name in the output folder
INDEX_FILE = "minhash_index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (id TEXT PRIMARY KEY, sig BLOB NOT NULL, run TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bands (key TEXT NOT NULL, id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS bands_key ON bands (key);
"""


class IndexMismatchError(PipelineConfigError):
    """The LSH index was built with other MinHash parameters (the message says which)."""


def _signature_params(p: MinHashParams) -> dict:
    """The parameters that decide the signatures and bands (not ``max_bucket``)."""
    d = dataclasses.asdict(p)
    d.pop("max_bucket", None)
    return d


class LSHIndex:
    """A persistent MinHash LSH index in an SQLite file.

    Args:
        path: the SQLite file (created with its folder if missing).
        params: the stage's MinHash parameters.

    Raises:
        IndexMismatchError: the file holds an index built with other parameters.
        PipelineConfigError: the file is not an SQLite database.
    """

    def __init__(self, path: str | Path, params: MinHashParams):
        self.path = Path(path)
        self.params = params
        self.bands, self.rows = lsh_bands(params.threshold, params.num_perm)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: each check is its own explicit BEGIN IMMEDIATE transaction
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            want = json.dumps(_signature_params(params), sort_keys=True)
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'params'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('params', ?)", (want,))
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise PipelineConfigError(f"{self.path}: not a usable LSH index ({e})") from e
        if row is not None and row[0] != want:
            self._db.close()
            raise IndexMismatchError(
                f"{self.path} was built with MinHash parameters {row[0]}, not {want}; "
                "use a new output folder or delete the index"
            )

    def check_and_add(self, doc_id: str, hv: np.ndarray, run: str = "") -> str | None:
        """Check document ``doc_id`` with signature ``hv`` (``(num_perm,)`` uint64), seen by
        run ``run``, against the index.

        Returns:
            None to keep it (it is added to the index; also None when this run added it
            before), ``doc_id`` itself when an earlier run indexed it, or the id of the first
            earlier near-duplicate.
        """
        keys = band_keys(hv, self.bands, self.rows)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT run FROM docs WHERE id = ?", (doc_id,)).fetchone()
            if row is not None:
                db.execute("COMMIT")
                return None if row[0] == run else doc_id
            marks = ",".join("?" * len(keys))
            candidates = db.execute(
                f"SELECT DISTINCT d.id, d.sig FROM bands b JOIN docs d ON d.id = b.id "
                f"WHERE b.key IN ({marks}) ORDER BY d.id",
                keys,
            ).fetchall()
            for other, sig in candidates:
                if float(np.mean(np.frombuffer(sig, dtype=np.uint64) == hv)) >= (
                    self.params.threshold
                ):
                    db.execute("COMMIT")
                    return other
            db.execute("INSERT INTO docs VALUES (?, ?, ?)", (doc_id, hv.tobytes(), run))
            db.executemany("INSERT INTO bands VALUES (?, ?)", [(k, doc_id) for k in keys])
            db.execute("COMMIT")
            return None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        """Documents in the index."""
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()


class _DropSeen(CountingDoFn):
    """doc -> doc, unless an earlier document in the index is its near-duplicate."""

    def __init__(self, p: MinHashParams, index_path: str, stage: str, run: str):
        self.p, self.index_path, self.run = p, index_path, run
        self.counters = StageCounters(stage)
        self._hasher = self._index = None

    def setup(self):
        self._hasher = MinHasher(self.p)
        self._index = LSHIndex(self.index_path, self.p)

    def process(self, doc: dict) -> Iterator[dict]:
        self.counters.seen.inc()
        other = self._index.check_and_add(doc["id"], self._hasher(doc["text"]), self.run)
        if other is not None:
            self.counters.drop("seen_in_earlier_run" if other == doc["id"] else "near_duplicate")
            return
        self.counters.kept.inc()
        yield doc

    def teardown(self):
        if self._index is not None:
            self._index.close()


class StreamingMinHashDedup(beam.PTransform):
    """Drop each document that is a near-duplicate of one seen before (see the module
    docstring). Counters: ``in``, ``kept``, ``dropped.near_duplicate``,
    ``dropped.seen_in_earlier_run``.

    Args:
        params: the MinHash parameters (the same as in batch mode).
        index_path: the SQLite index file.
        run: this run's id (a fresh uuid by default): what tells a retry from a restart.

    Raises (at construction):
        IndexMismatchError: the index holds signatures made with other parameters.
    """

    def __init__(
        self,
        params: MinHashParams,
        index_path: str,
        stage: str = "minhash_dedup",
        run: str | None = None,
    ):
        super().__init__()
        self.params, self.index_path, self.stage = params, index_path, stage
        self.run = run or uuid.uuid4().hex
        LSHIndex(index_path, params).close()  # fail now, not on a worker

    def expand(self, docs):
        fn = _DropSeen(self.params, self.index_path, self.stage, self.run)
        return docs | "DropSeen" >> beam.ParDo(fn)
