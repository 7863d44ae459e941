"""A per-request score cache for ``deepwhale eval --resume`` (stdlib ``sqlite3``, WAL).

One file, ``eval_cache.sqlite`` in the ``--out`` folder. Each scored request is stored under
``sha256(identity, task, max_len, context ids, continuation ids)`` as its exact float64
log-prob, greedy flag and continuation length, committed after every scored batch, so a run
killed part way (Ctrl-C, SIGKILL) loses at most one batch. A resumed run scores only the
missing requests; because a row's score does not depend on the other rows of its batch (see
:mod:`deepwhale.eval.scoring`), its results are bitwise those of an uninterrupted run.

Greedy generations (``generate_until`` tasks) are stored the same way, one row per prompt under
``sha256(identity, task, "generate", max_len, max_gen_toks, until, prompt ids)``, holding the
response text; greedy output does not depend on the batch (see :mod:`deepwhale.eval.gen_runner`),
so a resumed run gives the same responses and scores.

The model identity (checkpoint path, each weight file's size and mtime, the config.json hash,
dtype, quantization mode) is written in the file; a cache made for another identity, or a file
that is not such a cache, raises :class:`CacheError` instead of giving a wrong score.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path

from deepwhale.eval.scoring import Score

SCHEMA = "deepwhale-eval-cache/1"
FILENAME = "eval_cache.sqlite"


class CacheError(ValueError):
    """The cache file is corrupt, of another schema, or made for another model."""


def model_identity(model, quantize: str | None = None) -> dict:
    """What a cached score depends on: folder, weight files (name, bytes, mtime ns), a sha256
    of config.json, dtype and quantization mode. ``model`` is a DeepSeekModel, or a
    :class:`~deepwhale.eval.remote.RemoteModel` (its URL, model id and context)."""
    if hasattr(model, "identity"):
        return {**model.identity(), "quantize": quantize}
    ident: dict = {"path": None, "files": [], "config_sha256": None}
    if model.path is not None:
        folder = Path(model.path).resolve()
        ident["path"] = str(folder)
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            st = f.stat()
            ident["files"].append([f.name, st.st_size, st.st_mtime_ns])
        cfg = folder / "config.json"
        if cfg.exists():
            ident["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    ident["dtype"] = str(next(model.module.parameters()).dtype).removeprefix("torch.")
    ident["quantize"] = quantize
    return ident


def request_key(identity: str, task: str, max_len: int, ctx: list[int], cont: list[int]) -> bytes:
    """32-byte sha256 over the identity JSON, task name, max_len and both id lists."""
    h = hashlib.sha256()
    for part in (identity, task):
        b = part.encode()
        h.update(struct.pack("<Q", len(b)) + b)
    h.update(struct.pack("<QQQ", max_len, len(ctx), len(cont)))
    h.update(struct.pack(f"<{len(ctx) + len(cont)}q", *ctx, *cont))
    return h.digest()


class ScoreCache:
    """Open (or create) the cache at ``path`` for ``identity`` (from :func:`model_identity`).

    ``fresh=True`` empties an existing cache first (a run without ``--resume``).

    Raises:
        CacheError: not an SQLite file, another schema, or another model identity (the
            message names the file and says to delete it or drop ``--resume``).
    """

    def __init__(self, path: str | Path, identity: dict, fresh: bool = False) -> None:
        self.path = Path(path)
        self.identity = json.dumps(identity, sort_keys=True)
        self.hits = 0
        self.stored = 0
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key BLOB PRIMARY KEY, logprob REAL NOT NULL,"
                " greedy INTEGER NOT NULL, tokens INTEGER NOT NULL)"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS generations (key BLOB PRIMARY KEY, text TEXT NOT NULL)"
            )
            meta = dict(self.db.execute("SELECT k, v FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise CacheError(f"{self.path}: not a deepwhale eval cache ({e}); delete it") from None
        if meta and meta.get("schema") != SCHEMA:
            raise CacheError(f"{self.path}: cache schema {meta.get('schema')!r}, want {SCHEMA!r}")
        if meta and not fresh and meta.get("identity") != self.identity:
            raise CacheError(
                f"{self.path}: the cache was made for another model, dtype or quantization; "
                "delete it or run without --resume"
            )
        with self.db:
            if fresh or not meta:
                self.db.execute("DELETE FROM scores")
                self.db.execute("DELETE FROM generations")
                self.db.execute("DELETE FROM meta")
                self.db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("schema", SCHEMA), ("identity", self.identity)],
                )

    def keys(self, task: str, max_len: int, requests: Sequence[tuple[list[int], list[int]]]):
        """One key per request (see :func:`request_key`)."""
        return [request_key(self.identity, task, max_len, c, t) for c, t in requests]

    def get(self, keys: Sequence[bytes], requests) -> list[Score | None]:
        """Cached scores (None where missing), in ``keys`` order.

        Raises:
            CacheError: a stored row's token count disagrees with its request.
        """
        out: list[Score | None] = []
        for key, (_, cont) in zip(keys, requests, strict=True):
            row = self.db.execute(
                "SELECT logprob, greedy, tokens FROM scores WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                out.append(None)
                continue
            if row[2] != len(cont) or not isinstance(row[0], float):
                raise CacheError(f"{self.path}: a cached row does not match its request; delete it")
            out.append(Score(row[0], bool(row[1]), row[2]))
            self.hits += 1
        return out

    def put(self, keys: Sequence[bytes], scores: Sequence[Score]) -> None:
        """Store one batch and commit it (durable once this returns)."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                [
                    (k, s.logprob, int(s.is_greedy), s.tokens)
                    for k, s in zip(keys, scores, strict=True)
                ],
            )
        self.stored += len(scores)

    def generation_keys(
        self, task: str, max_len: int, max_gen: int, until: Sequence[str], prompts
    ) -> list[bytes]:
        """One key per greedy prompt: :func:`request_key` over the task, ``max_len`` and the
        prompt ids, with ``max_gen`` (tokens) and the ``until`` strings folded into the task
        part, so changing either misses the cache."""
        tag = json.dumps([task, "generate", max_gen, list(until)])
        return [request_key(self.identity, tag, max_len, list(p), []) for p in prompts]

    def get_generations(self, keys: Sequence[bytes]) -> list[str | None]:
        """Cached response texts (None where missing), in ``keys`` order.

        Raises:
            CacheError: a stored row is not text.
        """
        out: list[str | None] = []
        for key in keys:
            row = self.db.execute("SELECT text FROM generations WHERE key = ?", (key,)).fetchone()
            if row is not None and not isinstance(row[0], str):
                raise CacheError(f"{self.path}: a cached generation is not text; delete it")
            out.append(None if row is None else row[0])
            self.hits += row is not None
        return out

    def put_generations(self, keys: Sequence[bytes], texts: Sequence[str]) -> None:
        """Store one batch of responses and commit it (durable once this returns)."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO generations VALUES (?, ?)",
                list(zip(keys, texts, strict=True)),
            )
        self.stored += len(texts)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
