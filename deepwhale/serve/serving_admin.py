"""The admin API's serving side: API keys, usage per key and the audit log, over HTTP.

:func:`~deepwhale.serve.app.create_app` puts one :class:`Admin` in ``app.state.admin`` when API
keys are on (``None`` otherwise: with ``--no-auth`` anyone could mint keys, so the admin API is
off and answers 404). The routes (:mod:`deepwhale.serve.routes.admin_api`) are reached only with
an ``admin`` key (:func:`deepwhale.serve.auth.route_roles`). Each call names its action in
``request.state.audit_action`` (e.g. ``keys.create key_0123456789ab role=user``), which the
audit middleware writes into that request's hash-chained row (chain format 2); the plain key of
a new key is in the response only, never in the log or the key store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from deepwhale.serve.audit import iter_rows, usage_by_day
from deepwhale.serve.audit import verify as verify_log
from deepwhale.serve.auth import APIKey, KeyStore
from deepwhale.serve.errors import APIError


class CreateKeyRequest(BaseModel):
    """``POST /admin/keys``: ``name`` (a label), ``role`` (``admin``, ``user`` or ``viewer``),
    ``models`` the key may use (``["*"]``: all), ``rate_limit`` in requests per minute (None:
    no limit)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "user", "viewer"] = "user"
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=1000)
    rate_limit: int | None = Field(default=None, ge=1, le=10_000_000)


def key_object(key: APIKey) -> dict:
    """The JSON of a stored key (``object: "api_key"``); never the plain key."""
    return {
        "object": "api_key",
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "models": list(key.models),
        "rate_limit": key.rate_limit,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "active": key.active,
    }


class Admin:
    """The stores behind the admin API.

    Args:
        keys: the server's key store; audit_path: its audit log file, or None when the server
            writes none (then usage and the audit routes answer 404).
    """

    def __init__(self, keys: KeyStore, audit_path: Path | None) -> None:
        self.keys, self.audit_path = keys, audit_path

    def _log(self) -> Path:
        if self.audit_path is None:
            raise APIError("this server writes no audit log", status=404, code="audit_log_off")
        return self.audit_path

    def create_key(self, request: Request, body: CreateKeyRequest) -> dict:
        """Make a key; the answer holds the plain key (``key``), the only time it is shown.

        Raises:
            APIError: 400 for a model list the store refuses (empty ids, commas).
        """
        try:
            plain, key = self.keys.create(body.name, body.role, body.models, body.rate_limit)
        except ValueError as e:
            raise APIError(str(e), param="models", code="invalid_key_request") from e
        request.state.audit_action = (
            f"keys.create {key.id} role={key.role} models={','.join(key.models)} "
            f"rate_limit={key.rate_limit}"
        )
        return {**key_object(key), "key": plain}

    def list_keys(self, request: Request) -> dict:
        """Every key, revoked ones included, oldest first (no plain keys: they are not kept)."""
        request.state.audit_action = "keys.list"
        return {"object": "list", "data": [key_object(k) for k in self.keys.list()]}

    def revoke_key(self, request: Request, key_id: str) -> dict:
        """Revoke ``key_id`` (idempotent); its next request gets 401.

        Raises:
            APIError: 404 ``key_not_found`` for an unknown id.
        """
        request.state.audit_action = f"keys.revoke {key_id}"
        try:
            return key_object(self.keys.revoke(key_id))
        except KeyError as e:
            raise APIError(
                f"no API key with id {key_id!r}", status=404, param="key_id", code="key_not_found"
            ) from e

    def usage(
        self, request: Request, key_id: str | None, since: str | None, until: str | None
    ) -> dict:
        """Requests and tokens per key and UTC day from the audit log
        (:func:`deepwhale.serve.audit.usage_by_day`).

        Raises:
            APIError: 400 for a date that is not ``YYYY-MM-DD``; 404 without an audit log.
        """
        request.state.audit_action = f"usage.read key_id={key_id} since={since} until={until}"
        try:
            rows = usage_by_day(self._log(), key_id, since, until)
        except ValueError as e:
            raise APIError(str(e), param="since" if "since" in str(e) else "until") from e
        except FileNotFoundError as e:
            raise APIError(str(e), status=404, code="audit_log_off") from e
        return {"object": "list", "data": rows}

    def export_lines(self, request: Request, since: int) -> Iterator[str]:
        """The audit rows with ``id > since`` as JSON lines (hashes included), for a stream.

        Raises:
            APIError: 404 without an audit log.
        """
        request.state.audit_action = f"audit.export since={since}"
        path = self._log()
        if not path.exists():
            raise APIError(f"{path}: no audit log", status=404, code="audit_log_off")
        return (json.dumps(r, ensure_ascii=False) + "\n" for r in iter_rows(path, since))

    def verify(self, request: Request) -> dict:
        """:func:`deepwhale.serve.audit.verify` of the log: ``{ok, rows, bad_id, reason}``.

        Raises:
            APIError: 404 without an audit log.
        """
        request.state.audit_action = "audit.verify"
        try:
            result = verify_log(self._log())
        except FileNotFoundError as e:
            raise APIError(str(e), status=404, code="audit_log_off") from e
        return {
            "object": "audit.verification",
            "ok": result.ok,
            "rows": result.rows,
            "bad_id": result.bad_id,
            "reason": result.reason,
        }


def admin_of(request: Request) -> Admin:
    """The app's :class:`Admin` (``app.state.admin``).

    Raises:
        APIError: 404 ``admin_api_off`` when the server runs without API keys.
    """
    admin = getattr(request.app.state, "admin", None)
    if admin is None:
        raise APIError(
            "the admin API is off: this server runs without API keys (--no-auth)",
            status=404,
            code="admin_api_off",
        )
    return admin
