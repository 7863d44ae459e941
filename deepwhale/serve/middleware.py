"""The server's pure ASGI middlewares: internal errors, body limit, API keys, metrics, audit.

:func:`deepwhale.serve.app.create_app` stacks them (innermost first): internal errors -> body
limit -> auth -> metrics -> audit, so the audit row sees the final status and the time to the last
byte, and keys are checked before a large body is read.

Imports the auth, audit and metrics modules and :mod:`deepwhale.serve.errors`; nothing of the
serving layer or the routes (they talk through ``scope["state"]``: ``api_key`` is set here, the
``audit_*`` values by the routes).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from deepwhale.serve.audit import AuditLog
from deepwhale.serve.auth import KeyStore, bearer_token, route_roles
from deepwhale.serve.bodypeek import PEEK_BYTES, has_body, model_from_prefix, peek_model
from deepwhale.serve.errors import error_response
from deepwhale.serve.metrics import Metrics
from deepwhale.serve.ratelimit import RateLimiter

logger = logging.getLogger("deepwhale.serve")

#: largest request body accepted, in bytes (8 MiB); larger bodies get 413
MAX_BODY_BYTES = 8 * 1024 * 1024

# The middlewares below are pure ASGI on purpose: Starlette's BaseHTTPMiddleware
# (``@app.middleware("http")``) passes every streamed body chunk through an extra task and memory
# stream, which cost about 0.6 ms of server CPU per SSE token with three of them stacked, and it
# hides client disconnects from the routes (encode/starlette discussion 2094).


class _StatusRecorder:
    """An ASGI ``send`` wrapper remembering the response status (500 until one is sent)."""

    def __init__(self, send) -> None:
        self.send, self.status, self.started = send, 500, False

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
        await self.send(message)


class InternalErrorMiddleware:
    """An exception escaping a route becomes a 500 in OpenAI's error shape instead of a dropped
    connection (an exception handler would not do: Starlette re-raises after a catch-all
    handler, and uvicorn then closes the client's keep-alive connection)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorder = _StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        except Exception as e:
            logger.exception("internal error on %s", scope["path"])
            if not recorder.started:
                response = error_response(
                    500, f"internal error: {type(e).__name__}: {e}", "server_error"
                )
                await response(scope, receive, send)


def _route_label(scope, routes: frozenset[str]) -> str:
    """The metrics label of a request: its path if a route's, else the template of the route
    that matched it (the router leaves it in ``scope["route"]``), else ``other``."""
    if scope["path"] in routes:
        return scope["path"]
    template = getattr(scope.get("route"), "path", None)
    return template if template in routes else "other"


class CountMiddleware:
    """Request latency (to the last byte, so streams count in full) and requests by route and
    status, into the server's Prometheus metrics. A path with parameters counts as its route's
    template (``/v1/models/{model_id:path}``); unknown paths count as route ``other``."""

    def __init__(self, app, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        recorder = _StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            status = recorder.status
            route = _route_label(scope, self.routes)
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()


async def _note_model(scope, receive) -> None:
    """Before refusing a request whose body no route will read: the model its body names
    (from the first 64 KiB, :func:`~deepwhale.serve.bodypeek.peek_model`) into
    ``scope["state"]["audit_model"]`` for the audit row."""
    if has_body(scope):
        model = await peek_model(receive)
        if model is not None:
            scope.setdefault("state", {})["audit_model"] = model


class AuthMiddleware:
    """API keys, roles and rate limits (see :mod:`deepwhale.serve.auth`).

    401 ``invalid_api_key`` (with ``WWW-Authenticate: Bearer``, RFC 6750) for a missing, unknown
    or revoked key; 403 ``insufficient_permissions`` for a role not allowed on the route; 429
    ``rate_limit_exceeded`` with ``Retry-After`` in seconds (RFC 6585 section 4) past the key's
    requests per minute, counted by ``limiter`` (SQLite, shared by every worker process; 503
    ``rate_limiter_unavailable`` with ``Retry-After: 1`` if its database cannot be written). The
    key is left in ``request.state.api_key`` for the routes and audit.
    """

    def __init__(self, app, keys: KeyStore, limiter: RateLimiter) -> None:
        self.app, self.keys, self.limiter = app, keys, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self.check(scope)
        if response is None:
            await self.app(scope, receive, send)
        else:
            await _note_model(scope, receive)
            await response(scope, receive, send)

    def check(self, scope) -> JSONResponse | None:
        """The refusal for this request, or None (and the key stored in the scope's state)."""
        path = scope["path"]
        roles = route_roles(path)
        if roles is None:
            return None
        token = bearer_token(Headers(scope=scope).get("authorization"))
        key = None if token is None else self.keys.verify(token)
        if key is None:
            why = (
                "Missing API key: send 'Authorization: Bearer <key>'"
                if token is None
                else "Incorrect API key provided (unknown or revoked)"
            )
            response = error_response(401, why, code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        scope.setdefault("state", {})["api_key"] = key
        if key.role not in roles:
            return error_response(
                403,
                f"the API key '{key.id}' has role '{key.role}'; {path} needs one of "
                f"{', '.join(sorted(roles))}",
                type="permission_error",
                code="insufficient_permissions",
            )
        try:
            retry = self.limiter.check(key.id, key.rate_limit)
        except sqlite3.Error:  # fail closed: an uncounted request must not slip past the limit
            logger.exception("rate limiter %s unavailable", self.limiter.path)
            response = error_response(
                503,
                "the rate limiter is unavailable; retry shortly",
                type="server_error",
                code="rate_limiter_unavailable",
            )
            response.headers["Retry-After"] = "1"
            return response
        if retry is not None:
            response = error_response(
                429,
                f"Rate limit reached for API key '{key.id}': {key.rate_limit} requests per "
                f"minute. Retry after {retry} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
            response.headers["Retry-After"] = str(retry)
            return response
        return None


def _admin_action(scope) -> str | None:
    """``"METHOD /admin/..."`` for an admin API call (the routes name the action in more
    detail when they run), else None."""
    path = scope["path"]
    return f"{scope.get('method', '')} {path}" if path.startswith("/admin/") else None


class AuditMiddleware:
    """Pure ASGI middleware appending one audit row per HTTP request once its last byte is
    sent (streams included), with the status sent and the latency in milliseconds. Routes leave
    the model, prompt, prompt token count and engine request in ``request.state`` (``audit_*``);
    ``audit_status`` overrides the status sent (499 for a stream the client closed);
    ``audit_action`` names an admin action. Requests refused before a route runs (401, 403, 429,
    413) carry the model their body names (auth and the body limit read it from the first
    64 KiB); a refused ``/admin/*`` call records its method and path as the action."""

    def __init__(self, app, log: AuditLog, prompts: bool) -> None:
        self.app, self.log, self.prompts = app, log, prompts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        recorder = _StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            status = recorder.status
            state = scope.get("state", {})
            key, req = state.get("api_key"), state.get("audit_request")
            row = dict(
                route=scope["path"],
                status=state.get("audit_status", status),
                latency_ms=(time.perf_counter() - start) * 1000,
                key_id=None if key is None else key.id,
                model=state.get("audit_model"),
                action=state.get("audit_action") or _admin_action(scope),
                prompt_tokens=len(req.prompt_ids)
                if req is not None
                else state.get("audit_prompt_tokens"),
                completion_tokens=state.get("audit_completion_tokens")
                if req is None
                else req.num_generated,
                prompt=state.get("audit_prompt") if self.prompts else None,
            )
            try:
                await asyncio.to_thread(self.log.append, **row)
            except Exception:
                logger.exception("could not append to the audit log %s", self.log.path)


class BodyLimitMiddleware:
    """Pure ASGI middleware refusing request bodies over ``limit`` bytes with 413 (OpenAI error
    shape): at once from ``Content-Length``, else while reading a chunked body, which is then
    replayed to the app. Later ``receive()`` calls (disconnect watching) pass through."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_response(
            413,
            f"the request body is larger than {self.limit} bytes",
            param=None,
            code="request_too_large",
        )
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _note_model(scope, receive)
            await too_big(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                first = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                model = model_from_prefix(b"".join(chunks)[:PEEK_BYTES])
                if model is not None:
                    scope.setdefault("state", {})["audit_model"] = model
                await too_big(scope, receive, send)
                return
        pending = (
            [first] if chunks is None else [{"type": "http.request", "body": b"".join(chunks)}]
        )

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
