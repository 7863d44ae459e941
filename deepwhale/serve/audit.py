"""A tamper-evident audit log of served requests: an append-only, hash-chained SQLite table.

Each row stores ``prev_hash`` (the previous row's ``hash``; 64 zeros for row 1) and
``hash = sha256(prev_hash + canonical JSON of the row's fields)``, where the fields are those of
the row's chain format, serialised with sorted keys and no spaces. Ids run 1, 2, 3... without
gaps, so :func:`verify` can name the first row that was edited (its hash no longer matches) or
deleted (a gap, or a broken link to the next row).

Chain formats (the ``chain_version`` column; NULL is format 1):

* 1 (:data:`FIELDS_V1`): every column of the first schema but ``hash`` (``id`` included);
* 2 (:data:`FIELDS`, written now): format 1 plus ``action`` (the admin API action, e.g.
  ``keys.create key_... role=user``) and ``chain_version`` itself, so a row cannot be passed off
  as format 1 without its hash failing.

A log written before format 2 gets the two columns added (``ALTER TABLE``, once) when a server
opens it; its old rows keep verifying under format 1, and the chain runs on through new rows.

Each :meth:`AuditLog.append` is its own committed transaction on a WAL database with
``synchronous=FULL``: a server killed mid-request loses only the rows not yet appended.

A chain alone cannot show that rows were cut from its end, so two anchors guard the tail:

* the *head* sidecar ``<log>.head`` (e.g. ``audit.sqlite.head``), JSON ``{"id", "hash"}`` of the
  newest row, rewritten atomically after every commit. :func:`verify` fails when the row it
  names is missing or has another hash. Rows newer than the head are fine (a crash between the
  commit and the head write is not tampering).
* the writer's memory: :class:`AuditLog` remembers the last ``(id, hash)`` it wrote (or read from
  the head at start). If that row has vanished or changed when it next appends, it logs an
  ERROR and chains the new row onto the remembered hash with the next id after it, so the cut
  stays visible to :func:`verify` as a gap (or a broken link) instead of being re-chained over.

Limit: someone who can edit both the database and the head file (and does so while no server
is running, or restarts it) can still cut the tail unnoticed. Anchor the log outside the
machine: export it (:func:`export`) or copy the head file to storage the server's host cannot
rewrite, on a schedule, and compare.

Strings are stored as valid UTF-8: a lone surrogate (which SQLite and SHA-256 input cannot
carry) is written as its ``\\udXXX`` escape, so every request still gets its row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from deepwhale.atomic import write_json
from deepwhale.serve.auth import now_iso

logger = logging.getLogger("deepwhale.serve.audit")

GENESIS = "0" * 64
#: the chain format :meth:`AuditLog.append` writes
CHAIN_VERSION = 2
#: the fields hashed by chain format 1 (rows whose ``chain_version`` is NULL)
FIELDS_V1 = (
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
#: the fields hashed by chain format 2
FIELDS = (*FIELDS_V1, "action", "chain_version")
_FORMATS = {1: FIELDS_V1, 2: FIELDS}

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
    hash TEXT NOT NULL,
    action TEXT,
    chain_version INTEGER
)
"""
#: columns added by chain format 2 (to a table made by format 1)
_ADDED = {"action": "TEXT", "chain_version": "INTEGER"}


def row_hash(fields: dict) -> str:
    """``sha256(prev_hash + canonical JSON of the fields of the row's chain format)`` as hex.

    ``fields`` holds :data:`FIELDS` (format 2) or :data:`FIELDS_V1` with ``chain_version``
    None or absent (format 1).

    Raises:
        ValueError: an unknown ``chain_version``.
    """
    version = fields.get("chain_version") or 1
    names = _FORMATS.get(version)
    if names is None:
        raise ValueError(f"unknown audit chain format {version!r}")
    body = json.dumps(
        {k: fields[k] for k in names}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256((fields["prev_hash"] + body).encode()).hexdigest()


def head_path(path: str | os.PathLike) -> Path:
    """The head anchor file of the log at ``path``: ``<path>.head``."""
    path = Path(path)
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    """``(id, hash)`` from the head file of ``path``; None if there is none.

    Raises:
        ValueError: the head file exists but is not ``{"id": int, "hash": str}`` JSON.
    """
    head = head_path(path)
    try:
        data = json.loads(head.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{head}: unreadable head anchor ({e})") from e
    if (
        not isinstance(data, dict)
        or type(data.get("id")) is not int
        or not isinstance(data.get("hash"), str)
    ):
        raise ValueError(f'{head}: the head anchor must be {{"id": int, "hash": str}}')
    return data["id"], data["hash"]


def _clean(value):
    """``value`` with lone surrogates in a string replaced by their backslash escapes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


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
        self._migrate()
        #: (id, hash) of the newest row this writer knows of: the head file, else the DB tail
        try:
            self._last = _read_head(self.path)
        except ValueError as e:
            logger.error("audit log %s: %s; anchoring on the database tail", self.path, e)
            self._last = None
        if self._last is None:
            self._last = self._db.execute(
                "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"
            ).fetchone()

    def _migrate(self) -> None:
        """Add the chain format 2 columns to a format 1 table (in a write transaction, so two
        servers opening the same old log at once do not both add them)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            have = {r[1] for r in db.execute("PRAGMA table_info(audit)")}
            for name, kind in _ADDED.items():
                if name not in have:
                    db.execute(f"ALTER TABLE audit ADD COLUMN {name} {kind}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _anchor(self, db: sqlite3.Connection) -> tuple[int, str]:
        """``(id, prev_hash)`` for the next row, inside the write transaction.

        Normally the database tail (possibly newer than ours: another process writes too).
        If the row this writer last knew is gone or changed, rows were cut or replaced: log an
        ERROR and continue the chain from the remembered row, leaving a gap for :func:`verify`.
        """
        last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if self._last is not None:
            known_id, known_hash = self._last
            row = db.execute("SELECT hash FROM audit WHERE id = ?", (known_id,)).fetchone()
            if row is None or row[0] != known_hash:
                logger.error(
                    "audit log %s: row %d (the newest this server wrote or the head anchor "
                    "names) is %s; rows were deleted or replaced. Continuing the chain from it, "
                    "so `deepwhale audit verify` reports the break.",
                    self.path,
                    known_id,
                    "missing" if row is None else "changed",
                )
                top = known_id if last is None else max(last[0], known_id)
                return top + 1, known_hash
        if last is None:
            return 1, GENESIS
        return last[0] + 1, last[1]

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
        action: str | None = None,
    ) -> dict:
        """Append and commit one row; returns its fields with ``hash``.

        Args:
            route: the request path; status: the HTTP status sent; latency_ms: wall time from
            request start to the last byte, in milliseconds; key_id: the API key's id (None when
            auth is off or the key was refused); model: the model id; prompt_tokens,
            completion_tokens: token counts when known; prompt: the prompt text (only when the
            server opted in); action: the admin action, for ``/admin/*`` calls. Lone surrogates
            in strings are stored escaped. Rows are written in chain format
            :data:`CHAIN_VERSION`.

        Raises:
            sqlite3.Error: the database cannot be written (the row is rolled back).
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row_id, prev = self._anchor(db)
                row = {
                    "id": row_id,
                    "time": now_iso(),
                    "key_id": _clean(key_id),
                    "route": _clean(route),
                    "model": _clean(model),
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "status": int(status),
                    "latency_ms": round(float(latency_ms), 3),
                    "prompt": _clean(prompt),
                    "prev_hash": prev,
                    "action": _clean(action),
                    "chain_version": CHAIN_VERSION,
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
            self._last = (row["id"], row["hash"])
            try:
                write_json(head_path(self.path), {"id": row["id"], "hash": row["hash"]})
            except OSError:  # the row is committed; verify still checks the older head
                logger.exception("could not write the audit head anchor %s", head_path(self.path))
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


def iter_rows(path: str | os.PathLike, since: int = 0):
    """Yield the rows of the log at ``path`` with ``id > since``, oldest first, as dicts of
    :data:`FIELDS` and ``hash`` (``action`` and ``chain_version`` None for a format 1 log not
    yet migrated). Opens the file read-only; the generator may be advanced from any thread.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no audit log")
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        have = {r[1] for r in db.execute("PRAGMA table_info(audit)")}
        cols = [c if c in have else f"NULL AS {c}" for c in (*FIELDS, "hash")]
        query = f"SELECT {', '.join(cols)} FROM audit WHERE id > ? ORDER BY id"
        for r in db.execute(query, (since,)):
            yield dict(r)
    finally:
        db.close()


def verify(path: str | os.PathLike) -> VerifyResult:
    """Walk the chain in ``path`` and report the first broken row.

    A row is *edited* when its stored hash differs from the recomputed one, and *deleted* when
    ids skip (the first missing id is named) or a row's ``prev_hash`` differs from the hash of
    the row before it (the row before was deleted or replaced). Rows of chain formats 1 and 2
    may both be present (a log written before format 2, then continued). Then the head anchor
    (``<path>.head``, see the module docstring) must name a row that exists with that hash;
    if not, rows were cut from the end (or the last row replaced). No head file is accepted
    (logs written before anchors existed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    try:
        head = _read_head(Path(path))
    except ValueError as e:
        head, head_error = None, str(e)
    else:
        head_error = None
    head_found: str | None = None  # the hash of the row the head names, once walked
    prev, expected, n = GENESIS, 1, 0
    for r in iter_rows(path):
        fields = dict(r)
        if fields["id"] != expected:
            return VerifyResult(
                False, n, expected, f"row {expected} was deleted (ids skip to {fields['id']})"
            )
        if fields["prev_hash"] != prev:
            return VerifyResult(
                False, n, expected, f"row {expected}: prev_hash does not match the row before it"
            )
        try:
            edited = row_hash(fields) != fields["hash"]
        except ValueError as e:  # an unknown chain_version: edited too
            return VerifyResult(False, n, expected, f"row {expected}: {e}")
        if edited:
            return VerifyResult(False, n, expected, f"row {expected} was edited (hash mismatch)")
        prev, expected, n = fields["hash"], expected + 1, n + 1
        if head is not None and fields["id"] == head[0]:
            head_found = fields["hash"]
    if head_error is not None:
        return VerifyResult(False, n, None, head_error)
    if head is not None:
        head_id, head_hash = head
        if head_found is None:
            return VerifyResult(
                False,
                n,
                head_id,
                f"row {head_id} was deleted: the head anchor {head_path(path).name} names it but "
                f"the log ends at row {n} (rows were cut from the end)",
            )
        if head_found != head_hash:
            return VerifyResult(
                False,
                n,
                head_id,
                f"row {head_id} does not match the head anchor {head_path(path).name} "
                "(replaced or re-hashed)",
            )
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
            for r in iter_rows(path):
                f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def usage_by_day(
    path: str | os.PathLike,
    key_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> list[dict]:
    """Requests and tokens per API key and UTC day, summed over the audit log at ``path``.

    Args:
        key_id: only this key (default: every key; rows without a key are never counted).
        since, until: first and last UTC day included, ``YYYY-MM-DD`` (default: unbounded).

    Returns:
        ``[{"key_id", "date", "requests", "ok", "prompt_tokens", "completion_tokens"}]`` by date,
        then key: ``requests`` counts every audited request of the key (refused ones too),
        ``ok`` those answered with a status under 400; token counts are those the rows hold.

    Raises:
        FileNotFoundError: ``path`` does not exist. ValueError: ``since`` or ``until`` is not a
        ``YYYY-MM-DD`` date.
    """
    from datetime import date, timedelta

    where, args = ["key_id IS NOT NULL"], []
    if key_id is not None:
        where.append("key_id = ?")
        args.append(key_id)
    for name, day, op, shift in (("since", since, ">=", 0), ("until", until, "<", 1)):
        if day is None:
            continue
        try:
            bound = date.fromisoformat(day) + timedelta(days=shift)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be a YYYY-MM-DD date, got {day!r}") from e
        where.append(f"time {op} ?")
        args.append(bound.isoformat())
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no audit log")
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT key_id, substr(time, 1, 10) AS day, COUNT(*), SUM(status < 400),"
            " COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)"
            f" FROM audit WHERE {' AND '.join(where)} GROUP BY key_id, day ORDER BY day, key_id",
            args,
        ).fetchall()
    finally:
        db.close()
    names = ("key_id", "date", "requests", "ok", "prompt_tokens", "completion_tokens")
    return [dict(zip(names, r, strict=True)) for r in rows]
