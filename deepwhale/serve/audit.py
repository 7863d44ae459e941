"""A tamper-evident audit log of served requests: an append-only, hash-chained SQLite table.

Each row stores ``prev_hash`` (the previous row's ``hash``; 64 zeros for row 1) and
``hash = sha256(prev_hash + canonical JSON of the row's fields)``, where the fields are every
column but ``hash`` itself (``id`` included), serialised with sorted keys and no spaces. Ids run
1, 2, 3... without gaps, so :func:`verify` can name the first row that was edited (its hash no
longer matches) or deleted (a gap, or a broken link to the next row).

Each :meth:`AuditLog.append` is its own committed transaction on a WAL database with
``synchronous=FULL``: a server killed mid-request loses only the rows not yet appended. A chain
cannot show that rows were cut from its end; keep exported copies (:func:`export`) to anchor it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from deepwhale.serve.auth import now_iso

GENESIS = "0" * 64
FIELDS = (
    "id",
    "time",
    "key_id",
    "route",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "latency_ms",
    "prompt",
    "prev_hash",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    key_id TEXT,
    route TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    prompt TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)
"""


def row_hash(fields: dict) -> str:
    """``sha256(prev_hash + canonical JSON of fields)`` as hex; ``fields`` holds :data:`FIELDS`."""
    body = json.dumps(
        {k: fields[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256((fields["prev_hash"] + body).encode()).hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    # explicit transactions; the connection is shared by threads under AuditLog's lock
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class AuditLog:
    """Appends hash-chained rows to ``path`` (created with its table if missing).

    Thread-safe: appends are serialised by a lock and by ``BEGIN IMMEDIATE`` (so two processes
    writing the same file still build one chain).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(self.path)
        self._db.execute(_SCHEMA)

    def append(
        self,
        route: str,
        status: int,
        latency_ms: float,
        key_id: str | None = None,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        prompt: str | None = None,
    ) -> dict:
        """Append and commit one row; returns its fields with ``hash``.

        Args:
            route: the request path; status: the HTTP status sent; latency_ms: wall time from
            request start to the last byte, in milliseconds; key_id: the API key's id (None when
            auth is off or the key was refused); model: the model id; prompt_tokens,
            completion_tokens: token counts when known; prompt: the prompt text (only when the
            server opted in).
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                row = {
                    "id": 1 if last is None else last[0] + 1,
                    "time": now_iso(),
                    "key_id": key_id,
                    "route": route,
                    "model": model,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "status": int(status),
                    "latency_ms": round(float(latency_ms), 3),
                    "prompt": prompt,
                    "prev_hash": GENESIS if last is None else last[1],
                }
                row["hash"] = row_hash(row)
                cols = (*FIELDS, "hash")
                db.execute(
                    f"INSERT INTO audit ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [row[c] for c in cols],
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return row

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: ``ok``; ``rows`` checked; ``bad_id`` of the first edited or
    deleted row (None when ok) and ``reason`` in words."""

    ok: bool
    rows: int
    bad_id: int | None = None
    reason: str = ""


def _rows(path: Path):
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no audit log")
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        yield from db.execute(f"SELECT {', '.join(FIELDS)}, hash FROM audit ORDER BY id")
    finally:
        db.close()


def verify(path: str | os.PathLike) -> VerifyResult:
    """Walk the chain in ``path`` and report the first broken row.

    A row is *edited* when its stored hash differs from the recomputed one, and *deleted* when
    ids skip (the first missing id is named) or a row's ``prev_hash`` differs from the hash of
    the row before it (the row before was deleted or replaced).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    prev, expected, n = GENESIS, 1, 0
    for r in _rows(Path(path)):
        fields = dict(r)
        if fields["id"] != expected:
            return VerifyResult(
                False, n, expected, f"row {expected} was deleted (ids skip to {fields['id']})"
            )
        if fields["prev_hash"] != prev:
            return VerifyResult(
                False, n, expected, f"row {expected}: prev_hash does not match the row before it"
            )
        if row_hash(fields) != fields["hash"]:
            return VerifyResult(False, n, expected, f"row {expected} was edited (hash mismatch)")
        prev, expected, n = fields["hash"], expected + 1, n + 1
    return VerifyResult(True, n)


def export(path: str | os.PathLike, out_jsonl: str | os.PathLike) -> int:
    """Write every row of ``path`` (hashes included) to ``out_jsonl``, one JSON object a line,
    atomically: a temp file in the same folder is fsynced and renamed over the target.

    Returns:
        The number of rows written.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in _rows(Path(path)):
                f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
