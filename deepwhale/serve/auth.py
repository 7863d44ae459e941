"""API keys for ``deepwhale serve``: a SQLite key store, roles, per-model grants, rate limits.

A key is ``dw-`` + ``secrets.token_urlsafe(32)`` (256 random bits). Only its SHA-256 hex digest
is stored; the plain key is returned once by :meth:`KeyStore.create` and never again. Clients
send it as ``Authorization: Bearer <key>`` (RFC 6750).

Roles and what they may call (checked by :func:`route_roles`):

* ``admin``: everything, and alone the admin API (``/admin/*``: keys, usage, the audit log);
* ``user``: ``/generate`` and ``/v1/*``;
* ``viewer``: ``/metrics`` and ``/dashboard/stats`` (the data behind ``/dashboard``).

``/health``, the ``/dashboard`` page shell (it holds no data) and the OpenAPI docs need no key. Errors follow OpenAI's codes: 401
``invalid_api_key`` for a missing, unknown or revoked key, 403 for a role or model the key is not
granted, 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds, RFC 6585 section 4 and
RFC 9110 section 10.2.3) when the key's requests-per-minute limit is used up (counted in SQLite
by :class:`deepwhale.serve.ratelimit.RateLimiter`, so every worker process shares one window).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROLES = ("admin", "user", "viewer")
KEYS_FILE = "keys.sqlite"
AUDIT_FILE = "audit.sqlite"
OPEN_ROUTES = frozenset(
    {"/health", "/dashboard", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    models TEXT NOT NULL,
    rate_limit INTEGER,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)
"""


def data_home(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``keys.sqlite`` and ``audit.sqlite``: ``data_dir``, else
    ``$DEEPWHALE_HOME``, else ``~/.deepwhale``. Created if missing (raises OSError if it cannot
    be)."""
    if data_dir is None:
        data_dir = os.environ.get("DEEPWHALE_HOME") or Path.home() / ".deepwhale"
    path = Path(data_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a plain key (keys carry 256 random bits, so no salt or KDF)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class APIKey:
    """One stored key (never the plain key).

    Attributes:
        id: public id (``key_`` + 12 hex digits), used by ``keys revoke`` and the audit log.
        name: a label for people.
        role: ``admin``, ``user`` or ``viewer``.
        models: model ids the key may use; ``("*",)`` means all.
        rate_limit: requests per minute, or None for no limit.
        created_at, revoked_at: ISO 8601 UTC times; ``revoked_at`` is None while active.
    """

    id: str
    name: str
    role: str
    models: tuple[str, ...]
    rate_limit: int | None
    created_at: str
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    @classmethod
    def _from_row(cls, row: tuple) -> APIKey:
        id_, name, role, models, rate, created, revoked = row
        return cls(id_, name, role, tuple(models.split(",")), rate, created, revoked)


class KeyStore:
    """API keys in a SQLite file (WAL mode; every query parameterized).

    Each call opens its own short connection, so one store is safe to share across threads and
    processes (the CLI can revoke a key while a server runs; the next request sees it).
    """

    _COLUMNS = "id, name, role, models, rate_limit, created_at, revoked_at"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:  # commit on success, roll back on error
                yield db
        finally:
            db.close()

    def create(
        self,
        name: str,
        role: str = "user",
        models: list[str] | tuple[str, ...] = ("*",),
        rate_limit: int | None = None,
    ) -> tuple[str, APIKey]:
        """Make a key; returns ``(plain_key, record)``. The plain key is not stored anywhere.

        Raises:
            ValueError: unknown role, empty name or model list, or a rate limit < 1.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not name.strip():
            raise ValueError("the key needs a non-empty name")
        models = tuple(m.strip() for m in models if m.strip())
        if not models or any("," in m for m in models):
            raise ValueError("models must be a non-empty list of model ids (or '*')")
        if rate_limit is not None and rate_limit < 1:
            raise ValueError(f"rate limit must be >= 1 request per minute, got {rate_limit}")
        plain = "dw-" + secrets.token_urlsafe(32)
        record = APIKey(
            "key_" + secrets.token_hex(6), name, role, models, rate_limit, now_iso(), None
        )
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys (id, name, role, models, rate_limit, key_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    name,
                    role,
                    ",".join(models),
                    rate_limit,
                    hash_key(plain),
                    record.created_at,
                ),
            )
        return plain, record

    def list(self) -> list[APIKey]:
        """All keys, revoked ones included, oldest first."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {self._COLUMNS} FROM api_keys ORDER BY created_at, id")
            return [APIKey._from_row(r) for r in rows]

    def revoke(self, key_id: str) -> APIKey:
        """Mark ``key_id`` revoked (idempotent: a second revoke keeps the first time).

        Raises:
            KeyError: no key has that id.
        """
        with self._connect() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now_iso(), key_id),
            )
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise KeyError(f"no API key with id {key_id!r}")
        return APIKey._from_row(row)

    def verify(self, plain: str) -> APIKey | None:
        """The active key whose hash matches ``plain``, or None (unknown or revoked)."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                (hash_key(plain),),
            ).fetchone()
        return None if row is None else APIKey._from_row(row)


def route_roles(path: str) -> frozenset[str] | None:
    """Roles allowed on ``path``; None for open routes. Unlisted paths need any valid key."""
    if path in OPEN_ROUTES:
        return None
    if path == "/admin" or path.startswith("/admin/"):
        return frozenset({"admin"})
    if path in ("/metrics", "/dashboard/stats"):
        return frozenset({"viewer", "admin"})
    if path in ("/generate", "/tokenize", "/detokenize", "/tokenizer_info") or path.startswith(
        "/v1/"
    ):
        return frozenset({"user", "admin"})
    return frozenset(ROLES)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
