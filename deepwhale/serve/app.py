"""The FastAPI app: OpenAI-compatible completions and chat over one continuous-batching engine.

Endpoints (shapes from the OpenAI API reference, https://platform.openai.com/docs/api-reference):

* ``POST /v1/completions``, ``POST /v1/chat/completions``: non-streaming JSON, or server-sent
  events (``stream: true``) of ``text_completion`` / ``chat.completion.chunk`` objects ending in
  ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with empty ``choices``.
* ``POST /v1/responses``: the Responses API, stateless (nothing stored): one ``response``
  object, or typed SSE events (``event:`` + ``data:`` with ``sequence_number``) from
  ``response.created`` to ``response.completed`` / ``response.incomplete``
  (:mod:`deepwhale.serve.serving_responses`).
* ``POST /v1/embeddings``: pooled (mean, or last token), L2-normalised final hidden states of
  strings or token ids, as floats or base64 float32 (:mod:`deepwhale.serve.serving_embeddings`).
* ``POST /generate``: ``{prompt, max_length, temperature, top_p}`` -> ``{output, usage}``, the
  shape of DeepSeek's FastAPI serving example.
* the admin API (``admin`` keys, :mod:`deepwhale.serve.routes.admin_api`): ``/admin/keys``
  (create, list, revoke), ``/admin/usage`` (per key and day, from the audit log),
  ``/admin/audit/export`` and ``/admin/audit/verify``; every call is audited with its action.
* ``GET /v1/models`` (``created``: the server's start time), ``GET /v1/models/{model}``,
  ``GET /health``; vLLM's ``GET /tokenizer_info``, ``POST /tokenize``,
  ``POST /detokenize``.

With ``auth=True`` every route but ``/health`` (and the OpenAPI docs) needs an API key from
:class:`~deepwhale.serve.auth.KeyStore` (``Authorization: Bearer <key>``): 401 for a missing, bad
or revoked key, 403 for the wrong role or a model the key may not use, 429 with ``Retry-After``
(RFC 6585) past the key's per-minute limit (counted in ``limits.sqlite``, so every worker process
on one data folder shares it). With a data folder (or ``audit=True``) every request
appends one hash-chained row to :class:`~deepwhale.serve.audit.AuditLog`.

The app is composed in layers (docs/ARCHITECTURE.md, "The server"): routes
(:mod:`deepwhale.serve.routes`) parse a body and call the serving layer
(:mod:`deepwhale.serve.serving`), which builds one typed
:class:`~deepwhale.inference.sampling.SamplingParams`, submits it to the model's one
:class:`~deepwhale.inference.engine.Engine` (its scheduler thread is started and stopped with the
app, so concurrent clients share decode steps) and formats the answer or the SSE stream;
:mod:`deepwhale.serve.bridge` carries chunks from the engine thread to the event loop; the
middlewares (:mod:`deepwhale.serve.middleware`) and error handlers
(:mod:`deepwhale.serve.errors`) wrap it all.

Bad input never yields a 500: validation errors, malformed JSON, prompts that do not fit, unknown
model names and invalid sampling values get 4xx responses in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; a body over
:data:`~deepwhale.serve.middleware.MAX_BODY_BYTES` gets 413; paths are matched exactly (no
trailing-slash redirects). Prompts are tokenized in a worker thread, so a huge prompt never stalls
other clients; a client that disconnects cancels its engine request, which frees its cache slot.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from os import PathLike

from fastapi import FastAPI

from deepwhale.api import DeepSeekModel
from deepwhale.serve.audit import AuditLog
from deepwhale.serve.auth import AUDIT_FILE, KEYS_FILE, KeyStore, data_home
from deepwhale.serve.errors import APIError, error_response, install_error_handlers
from deepwhale.serve.middleware import (
    MAX_BODY_BYTES,
    AuditMiddleware,
    AuthMiddleware,
    BodyLimitMiddleware,
    CountMiddleware,
    InternalErrorMiddleware,
)
from deepwhale.serve.ratelimit import RATE_FILE, RateLimiter
from deepwhale.serve.routes import admin, admin_api, generate, openai, tokenizer
from deepwhale.serve.serving import Serving
from deepwhale.serve.serving_admin import Admin

__all__ = ["MAX_BODY_BYTES", "APIError", "create_app", "error_response"]

logger = logging.getLogger("deepwhale.serve")
ROUTERS = (admin.router, admin_api.router, openai.router, tokenizer.router, generate.router)


def create_app(
    model: DeepSeekModel,
    model_name: str = "deepwhale",
    *,
    data_dir: str | PathLike | None = None,
    auth: bool = False,
    audit: bool | None = None,
    audit_prompts: bool = False,
    embedding_pooling: str = "mean",
    reasoning_parser: str = "auto",
    chat_template: str | None = None,
) -> FastAPI:
    """Build the FastAPI app serving ``model`` under ``model_name``.

    Args:
        model: a loaded :class:`~deepwhale.api.DeepSeekModel` with a tokenizer; its engine (with
            the batch size set by ``model.set_batch_size``) is started when the app starts and
            shut down when it stops.
        model_name: the id clients pass as ``model`` and ``/v1/models`` lists.
        data_dir: folder of ``keys.sqlite``, ``limits.sqlite`` and ``audit.sqlite`` (default: ``$DEEPWHALE_HOME``,
            else ``~/.deepwhale``; see :func:`~deepwhale.serve.auth.data_home`).
        auth: require API keys (off by default for library use; ``deepwhale serve`` turns it
            on unless ``--no-auth``). Off logs a WARNING.
        audit: append every request to ``audit.sqlite`` (default: on when ``data_dir`` is given).
        audit_prompts: also store prompt text in the audit log (off: counts only).
        embedding_pooling: ``/v1/embeddings``' default pooling of the final hidden states:
            ``"mean"`` over the input's tokens, or the ``"last"`` token's (a request's
            ``pooling`` field overrides it).
        reasoning_parser: ``"auto"`` (on for R1-style chat templates or a vocabulary with
            ``<think>``/``</think>``), ``"deepseek_r1"`` or ``"none"``: chat answers split
            ``<think>...</think>`` into ``reasoning_content``
            (:mod:`deepwhale.serve.reasoning`).
        chat_template: a Jinja chat template source used instead of the tokenizer's, for chat
            and responses (e.g. one that renders ``tools``).

    Returns:
        The :class:`fastapi.FastAPI` app (run it with uvicorn).

    Raises:
        ValueError: the model has no tokenizer, or an unknown ``embedding_pooling`` or
            ``reasoning_parser``.
        OSError: the data folder cannot be created.
    """
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: no tokenizer.json; serving needs one")
    audit = data_dir is not None if audit is None else audit
    home = data_home(data_dir) if auth or audit else None
    if not auth:
        logger.warning(
            "!!! API key authentication is OFF: anyone who can reach this server can use it !!!"
        )
    serving = Serving(
        model,
        model_name,
        embedding_pooling,
        reasoning_parser=reasoning_parser,
        chat_template=chat_template,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        serving.created = int(time.time())  # the model object's "created": the start time
        model.engine.start()
        try:
            yield
        finally:
            serving.bridge.cancel_all()
            model.engine.shutdown()

    app = FastAPI(title="deepwhale", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.serving = serving
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app)
    # middlewares, innermost first (each add_middleware wraps the ones before it)
    app.add_middleware(InternalErrorMiddleware)  # an escaping exception -> a 500 JSON body
    app.add_middleware(BodyLimitMiddleware, limit=MAX_BODY_BYTES)  # inside auth: keys first
    app.state.admin = None  # the admin API is off without keys: anyone could mint one
    if auth:
        keys = KeyStore(home / KEYS_FILE)
        app.state.admin = Admin(keys, home / AUDIT_FILE if audit else None)
        limiter = RateLimiter(home / RATE_FILE)  # shared by every process on this data folder
        app.add_middleware(AuthMiddleware, keys=keys, limiter=limiter)
    paths = frozenset(route.path for router in ROUTERS for route in router.routes)
    app.add_middleware(CountMiddleware, metrics=serving.metrics, routes=paths)
    if audit:  # outermost: it records the final status and the time to the last byte
        app.add_middleware(AuditMiddleware, log=AuditLog(home / AUDIT_FILE), prompts=audit_prompts)
    return app
