"""The admin API (``admin`` keys only): ``/admin/keys``, ``/admin/usage``, ``/admin/audit/*``.

* ``POST /admin/keys`` -> 201, the new key with its plain ``key`` (shown this once);
* ``GET /admin/keys``; ``DELETE /admin/keys/{key_id}`` (revoke);
* ``GET /admin/usage?key_id=&since=&until=``: requests and tokens per key and UTC day, from the
  audit log;
* ``GET /admin/audit/export?since=``: the audit rows as JSON lines (``application/x-ndjson``);
* ``GET /admin/audit/verify``: the hash chain's check.

Every call is audited with its action (:mod:`deepwhale.serve.serving_admin`).
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deepwhale.serve.serving_admin import CreateKeyRequest, admin_of

router = APIRouter(prefix="/admin")


@router.post("/keys", status_code=201)
def create_key(body: CreateKeyRequest, request: Request) -> JSONResponse:
    """Create a key; the answer's ``key`` is the plain key, shown only here."""
    return JSONResponse(admin_of(request).create_key(request, body), status_code=201)


@router.get("/keys")
def list_keys(request: Request) -> dict:
    """Every key (id, name, role, models, rate limit, times), never a plain key."""
    return admin_of(request).list_keys(request)


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, request: Request) -> dict:
    """Revoke a key: its next request gets 401."""
    return admin_of(request).revoke_key(request, key_id)


@router.get("/usage")
def usage(
    request: Request,
    key_id: str | None = Query(None, max_length=64),
    since: str | None = Query(None, max_length=10, description="first UTC day, YYYY-MM-DD"),
    until: str | None = Query(None, max_length=10, description="last UTC day, YYYY-MM-DD"),
) -> dict:
    """Requests (all, and ``ok``: status under 400) and prompt / completion tokens per key and
    UTC day."""
    return admin_of(request).usage(request, key_id, since, until)


@router.get("/audit/export")
def export_audit(request: Request, since: int = Query(0, ge=0, le=2**62)) -> StreamingResponse:
    """The audit rows with ``id > since``, one JSON object a line, hashes included."""
    lines = admin_of(request).export_lines(request, since)
    return StreamingResponse(lines, media_type="application/x-ndjson")


@router.get("/audit/verify")
def verify_audit(request: Request) -> dict:
    """Check the audit log's hash chain: ``{ok, rows, bad_id, reason}``."""
    return admin_of(request).verify(request)
