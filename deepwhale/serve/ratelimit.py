"""Per-key request rate limits kept in SQLite, shared by every server process on a data folder.

A sliding one-minute window: each allowed request of a limited key is one row
``(key_id, t)`` of the ``rate_events`` table in ``limits.sqlite`` (``t``: Unix time in seconds,
``time.time()``, the one clock all processes on a host share). A check is one
``BEGIN IMMEDIATE`` transaction (SQLite's write lock, taken before reading): drop the key's rows
older than the window, count the rest, and insert a row only if the count is under the limit.
Two workers (or two ``deepwhale serve`` processes on one ``--data-dir``) therefore never both
take the last slot: a key limited to N requests per minute gets at most N through all of them
together. The answer to a refused request is the ``Retry-After`` value of RFC 6585 section 4
(whole seconds until the oldest request in the window expires, RFC 9110 section 10.2.3).

WAL mode with ``synchronous=NORMAL``: a power loss may forget the last few requests (the window
then admits a few more), never corrupts the file.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RATE_FILE = "limits.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_events (key_id TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rate_events_key_t ON rate_events (key_id, t);
"""


class RateLimiter:
    """Sliding-window request limits in the SQLite file ``path`` (created if missing).

    Safe to share across threads and processes: each :meth:`check` is one ``BEGIN IMMEDIATE``
    transaction on this process's connection (kept open, under a lock: opening and closing a
    WAL database per check costs about 1.2 ms, mostly the checkpoint at the last close, against
    about 0.1 ms on an open connection).

    Args:
        path: the database file (the server uses ``<data dir>/limits.sqlite``).
        timeout_s: how long a check waits for another process's write lock before raising.
        window_s: window length in seconds (60: limits are requests per minute).
        clock: seconds as a float; must be the same clock in every process sharing ``path``
            (default ``time.time``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        window_s: float = 60.0,
        clock=time.time,
        timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.window_s, self.clock, self.timeout_s = window_s, clock, timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        with self._connection() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, under the lock (a forked child opens its own)."""
        with self._lock:
            if self._db is None or self._pid != os.getpid():
                self._db = sqlite3.connect(
                    self.path,
                    timeout=self.timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._pid = os.getpid()
            yield self._db

    def close(self) -> None:
        """Close this process's connection (the next check opens a new one)."""
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None

    def check(self, key_id: str, limit: int | None) -> int | None:
        """Record one request for ``key_id`` if its window has room.

        Args:
            key_id: the API key's id; limit: requests allowed per window, None for no limit
            (nothing is stored then).

        Returns:
            None if the request is allowed (and counted), else the whole seconds (>= 1) until
            the oldest request in the window expires: the ``Retry-After`` value.

        Raises:
            sqlite3.Error: the database cannot be written (after waiting ``timeout_s`` for the
                lock); nothing is counted.
        """
        if limit is None:
            return None
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock()
                db.execute(
                    "DELETE FROM rate_events WHERE key_id = ? AND t <= ?",
                    (key_id, now - self.window_s),
                )
                count, oldest = db.execute(
                    "SELECT COUNT(*), MIN(t) FROM rate_events WHERE key_id = ?", (key_id,)
                ).fetchone()
                if count >= limit:
                    retry = max(1, math.ceil(oldest + self.window_s - now))
                else:
                    db.execute("INSERT INTO rate_events (key_id, t) VALUES (?, ?)", (key_id, now))
                    retry = None
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return retry

    def used(self, key_id: str) -> int:
        """Requests of ``key_id`` counted in the current window (read only)."""
        with self._connection() as db:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM rate_events WHERE key_id = ? AND t > ?",
                (key_id, self.clock() - self.window_s),
            ).fetchone()
        return n
