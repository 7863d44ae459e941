"""The FastAPI app: OpenAI-compatible completions and chat over one continuous-batching engine.

Endpoints (shapes from the OpenAI API reference, https://platform.openai.com/docs/api-reference):

* ``POST /v1/completions``, ``POST /v1/chat/completions``: non-streaming JSON, or server-sent
  events (``stream: true``) of ``text_completion`` / ``chat.completion.chunk`` objects ending in
  ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with empty ``choices``.
* ``POST /generate``: ``{prompt, max_length, temperature, top_p}`` -> ``{output, usage}``, the
  shape of DeepSeek's FastAPI serving example.
* ``GET /v1/models``, ``GET /health``; vLLM's ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``.

With ``auth=True`` every route but ``/health`` (and the OpenAPI docs) needs an API key from
:class:`~deepwhale.serve.auth.KeyStore` (``Authorization: Bearer <key>``): 401 for a missing, bad
or revoked key, 403 for the wrong role or a model the key may not use, 429 with ``Retry-After``
(RFC 6585) past the key's per-minute limit. With a data folder (or ``audit=True``) every request
appends one hash-chained row to :class:`~deepwhale.serve.audit.AuditLog`.

Every request is submitted to the model's one :class:`~deepwhale.inference.engine.Engine`, whose
scheduler runs in a background thread (started and stopped with the app), so concurrent clients
share decode steps. A request's blocking chunk iterator is pumped by a small thread into an
``asyncio.Queue`` (``loop.call_soon_threadsafe``), so the event loop never blocks; a client that
disconnects mid-stream cancels its engine request, which frees its cache slot.

Bad input never yields a 500: exception handlers turn validation errors, malformed JSON, prompts
that do not fit, unknown model names and invalid sampling values into 4xx responses in OpenAI's
error shape ``{"error": {"message", "type", "param", "code"}}``. A body that is not a JSON object
gets one message saying so; a string with a lone surrogate gets 400 naming the field; a body
over :data:`MAX_BODY_BYTES` gets 413; paths are matched exactly (no trailing-slash redirects).
Prompts are tokenized in a worker thread, so a huge prompt never stalls other clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from importlib.resources import files
from os import PathLike

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepwhale.api import DeepSeekModel
from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.inference.engine import TokenLogprob
from deepwhale.inference.generate import GenerationChunk, PromptTooLongError
from deepwhale.inference.prompt_logprobs import prompt_logprobs
from deepwhale.inference.sampling import SamplingParams
from deepwhale.serve.audit import AuditLog
from deepwhale.serve.auth import (
    AUDIT_FILE,
    KEYS_FILE,
    KeyStore,
    RateLimiter,
    bearer_token,
    data_home,
    route_roles,
)
from deepwhale.serve.metrics import Metrics
from deepwhale.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    InvalidUnicodeError,
    TokenizeRequest,
    _Sampling,
)
from deepwhale.serve.stats import LiveStats

_END = object()
#: largest request body accepted, in bytes (8 MiB); larger bodies get 413
MAX_BODY_BYTES = 8 * 1024 * 1024
_NOT_AN_OBJECT = "the request body must be a JSON object sent with Content-Type: application/json"


_DASHBOARD_HTML = files("deepwhale.serve").joinpath("dashboard.html").read_text(encoding="utf-8")
logger = logging.getLogger("deepwhale.serve")


def _is_type_tag(part) -> bool:
    """Whether a pydantic error location part names a union member, not a field."""
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")
    )


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``
    (OpenAI's error object)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    """Map exceptions to OpenAI-shaped errors: user errors -> 4xx, anything else -> 500."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
        # drop "body" and the union-member tags pydantic puts in locations ("str", "list[...]")
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
        param = ".".join(loc) or None
        if param is None and first.get("type") in ("missing", "model_attributes_type"):
            return error_response(400, _NOT_AN_OBJECT)  # empty, form-encoded, array, ...
        if first.get("type") == "deepwhale":  # our own checks (schemas._fail): said in full
            return error_response(400, first["msg"], param=param)
        where = f"'{param}': " if param else ""
        return error_response(
            400, f"invalid {where}{first.get('msg', 'invalid request')}", param=param
        )

    @app.exception_handler(InvalidUnicodeError)
    async def _unicode(_: Request, e: InvalidUnicodeError) -> JSONResponse:
        return error_response(400, str(e), param=e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(PromptTooLongError)
    async def _too_long(_: Request, e: PromptTooLongError) -> JSONResponse:
        return error_response(400, str(e), param="prompt", code="context_length_exceeded")

    @app.exception_handler(ValueError)  # SamplingParams, TokenizerError, engine.add_request
    async def _value(_: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e))

    app.add_middleware(_InternalErrorMiddleware)


class _Server:
    """Request handling shared by the routes: validation, submission, streaming, formatting."""

    def __init__(self, model: DeepSeekModel, model_name: str) -> None:
        self.model = model
        self.model_name = model_name
        self.active: set[EngineRequest] = set()
        self.metrics = Metrics(lambda: model.engine)
        self.stats = LiveStats(lambda: (len(model.engine.running), len(model.engine.waiting)))

    # ------------------------------------------------------------------ validation
    def authorize(self, request: Request, name: str | None, prompt) -> None:
        """Note the request's model and prompt for the audit log, and refuse (403,
        ``model_not_allowed``) a model the request's API key may not use."""
        state = request.state
        state.audit_model = name or self.model_name
        state.audit_prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        key = getattr(state, "api_key", None)
        if key is None:
            return
        for m in dict.fromkeys((name or self.model_name, self.model_name)):
            if not key.allows_model(m):
                raise APIError(
                    f"the API key '{key.id}' may not use the model '{m}'",
                    status=403,
                    type="permission_error",
                    param="model",
                    code="model_not_allowed",
                )

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def encode(self, request: Request, prompt: str | list[dict]) -> list[int]:
        """Token ids of a prompt, tokenized in a worker thread (a multi-megabyte prompt takes
        seconds); the count is noted for the audit log."""
        ids = await asyncio.to_thread(self.model.encode_prompt, prompt)
        request.state.audit_prompt_tokens = len(ids)
        return ids

    async def encode_prompts(self, request: Request, prompts: list) -> list[list[int]]:
        """Token ids of each ``/v1/completions`` prompt: strings are tokenized in a worker
        thread, token-id lists are checked against the vocabulary (400 naming ``prompt``)."""
        vocab = self.model.config.vocab_size
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt must not be empty", param="prompt")
                out.append(await asyncio.to_thread(self.model.encode_prompt, p))
            elif any(not 0 <= i < vocab for i in p):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            else:
                out.append(list(p))
        request.state.audit_prompt_tokens = sum(len(ids) for ids in out)
        return out

    def budget(
        self, prompt_ids: list[int], max_tokens: int | None, param: str, echo: bool = False
    ) -> int:
        """New-token budget: ``max_tokens`` checked against the context, or all that is left.
        With ``echo``, 0 is allowed (score the prompt only) and the prompt may fill the context.
        """
        ctx = self.model.engine.max_seq_len
        if echo and max_tokens == 0:
            if len(prompt_ids) > ctx:
                raise PromptTooLongError(
                    f"the prompt is {len(prompt_ids)} tokens, but this model's context is {ctx} "
                    "tokens; shorten the prompt"
                )
            return 0
        if len(prompt_ids) >= ctx:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens, but this model's context is {ctx} "
                "tokens; shorten the prompt"
            )
        if max_tokens is None:
            return ctx - len(prompt_ids)
        if max_tokens < 1:
            hint = (
                " (0 is allowed with echo: score the prompt only)" if param == "max_tokens" else ""
            )
            raise APIError(f"{param} must be >= 1, got {max_tokens}{hint}", param=param)
        if len(prompt_ids) + max_tokens > ctx:
            raise APIError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    @staticmethod
    def sampling(body: _Sampling | GenerateRequest, max_new_tokens: int) -> dict:
        """SamplingParams fields from a body; raises ValueError (-> 400) for bad values."""
        fields = dict(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            max_new_tokens=max_new_tokens,
            stop=body.stop,
            seed=body.seed,
            ignore_eos=getattr(body, "ignore_eos", False),
        )
        SamplingParams(**fields)
        return fields

    def submit(self, ids: list[int], n: int, logprobs: int | None, sampling: dict):
        return self.model.submit(ids, n=n, logprobs=logprobs, **sampling)

    # ------------------------------------------------------------------ the async bridge
    async def events(self, req: EngineRequest) -> AsyncIterator[list[tuple[int, GenerationChunk]]]:
        """Yield lists of ``(index, chunk)`` from the engine without blocking the loop: every
        item that arrived since the consumer last asked (one item when it keeps up; several
        when the engine runs ahead, so a slow consumer sends fewer, larger SSE events). The
        engine request is cancelled if the consumer stops early (client disconnect, error)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # engine thread: hand over to the event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, _END if item is None else item)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

        self.active.add(req)
        req.on_output(sink)
        last = start = time.perf_counter()
        ttft, ok = None, False
        try:
            done = False
            while not done:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = []
                for item in items:
                    if item is _END:
                        done = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if item[1].token_id is not None:
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - start
                            self.metrics.ttft.observe(ttft)
                        else:
                            self.metrics.itl.observe(now - last)
                        last = now
                        self.stats.token()
                    batch.append(item)
                if batch:
                    yield batch
            ok = True
        except (GeneratorExit, asyncio.CancelledError):
            ok = True  # the client went away: not a server error
            raise
        finally:
            self.active.discard(req)
            if not req.finished:
                self.model.engine.cancel(req)
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
            self.metrics.generated_tokens.inc(req.num_generated)
            self.stats.request(time.perf_counter() - start, ttft, ok)

    async def drain(self, req: EngineRequest | list[EngineRequest], request: Request) -> None:
        """Wait until ``req`` (one engine request or several) finished (non-streaming
        responses). If the client disconnects first, the engine requests are cancelled (their
        slots freed) and 499 is returned."""
        reqs = req if isinstance(req, list) else [req]

        async def consume_one(one: EngineRequest) -> None:
            async with aclosing(self.events(one)) as events:
                async for _ in events:
                    pass

        async def consume() -> None:
            await asyncio.gather(*(consume_one(r) for r in reqs))

        async def disconnected() -> None:
            # ``request.is_disconnected()`` never fires behind BaseHTTPMiddleware
            # (encode/starlette discussion 2094); waiting on receive() does (vLLM PR 11096).
            while (await request.receive())["type"] != "http.disconnect":
                await asyncio.sleep(0.1)  # never spin if a server hands out empty bodies

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # events()' finally cancels the engine request
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():  # the client left (nginx's 499: nobody reads this answer)
            raise APIError("the client closed the connection", 499, code="client_closed_request")
        work.result()  # re-raise an engine failure

    # ------------------------------------------------------------------ formatting
    def token_text(self, token_id: int) -> str:
        """The text a token adds mid-sequence (leading space kept; see
        :meth:`deepwhale.tokenizer.Tokenizer.token_text`)."""
        return self.model.tokenizer.token_text(token_id)

    def text_offsets(self, prompt_ids: list[int], lps: list[TokenLogprob]) -> list[int]:
        """Character offset in the completion text where each token's text starts: the
        cumulative lengths of the streamed deltas (the same incremental detokenizer as the
        engine, so they equal the offsets a stream reports)."""
        detok = self.model.tokenizer.detokenizer(prompt_ids, skip_special_tokens=True)
        offsets, offset = [], 0
        for lp in lps:
            offsets.append(offset)
            offset += len(detok.add(lp.token_id))
        return offsets

    def completion_logprobs(self, lps: list[TokenLogprob], offsets: list[int]) -> dict:
        """OpenAI legacy ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset
        (``offsets``, characters into the completion text)."""
        return {
            "tokens": [self.token_text(lp.token_id) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def echo_logprobs(self, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        """Legacy ``logprobs`` of the prompt tokens (``echo``): ``entries[0]`` is None, so the
        first token's ``token_logprobs`` and ``top_logprobs`` are null; offsets are characters
        into the decoded prompt."""
        detok = self.model.tokenizer.detokenizer([], skip_special_tokens=True)
        offsets, offset = [], 0
        for t in ids:
            offsets.append(offset)
            offset += len(detok.add(t))
        return {
            "tokens": [self.token_text(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [
                None if e is None else {self.token_text(t): v for t, v in e.top} for e in entries
            ],
            "text_offset": offsets,
        }

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``;
        ``bytes`` are the token's own UTF-8 bytes (one byte for a ``<0xNN>`` token)."""
        tok = self.model.tokenizer

        def entry(token_id: int, logprob: float) -> dict:
            return {
                "token": tok.token_text(token_id),
                "logprob": logprob,
                "bytes": list(tok.token_bytes(token_id)),
            }

        return {
            "content": [
                {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in lps
            ]
        }

    @staticmethod
    def usage(req: EngineRequest) -> dict:
        prompt, completion = len(req.prompt_ids), req.num_generated
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def stream(
        self,
        request: Request,
        req: EngineRequest,
        obj: str,
        chat: bool,
        include_usage: bool,
        logprobs: bool,
    ) -> EventSourceResponse:
        """SSE response of ``obj`` chunks for ``req``, ending with ``data: [DONE]``.

        A client disconnect makes sse-starlette cancel the generator; the ``CancelledError``
        unwinds through :meth:`events`, whose ``finally`` cancels the engine request, and
        ``request.state.audit_status`` is set to 499 for the audit log.
        """
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        offsets = [0] * req.n

        def event(choices: list[dict], usage: dict | None = None) -> dict:
            body = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage
            return {"data": json.dumps(body, ensure_ascii=False)}

        def choice(i: int, chunk: GenerationChunk) -> dict:
            lps = [chunk.logprobs] if logprobs and chunk.logprobs is not None else None
            if chat:
                delta = {"content": chunk.text} if chunk.text else {}
                lp = self.chat_logprobs(lps) if lps else None
                return {
                    "index": i,
                    "delta": delta,
                    "logprobs": lp,
                    "finish_reason": chunk.finish_reason,
                }
            lp = self.completion_logprobs(lps, [offsets[i]]) if lps else None
            offsets[i] += len(chunk.text)
            return {
                "index": i,
                "text": chunk.text,
                "logprobs": lp,
                "finish_reason": chunk.finish_reason,
            }

        async def generator():
            try:
                async for item in body():
                    yield item
            except (asyncio.CancelledError, GeneratorExit):
                request.state.audit_status = 499  # the client left mid-stream
                raise

        async def body():
            async with aclosing(self.events(req)) as events:
                if chat:
                    for i in range(req.n):
                        first = {"role": "assistant", "content": ""}
                        yield event(
                            [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}]
                        )
                try:
                    async for batch in events:
                        for i, chunk in batch if logprobs else _merge(batch):
                            if chunk.finish_reason == "cancelled":
                                continue
                            if chunk.text or chunk.finish_reason or (logprobs and chunk.logprobs):
                                yield event([choice(i, chunk)])
                except Exception as e:  # the engine failed mid-stream: tell the client, then stop
                    err = {"message": f"{type(e).__name__}: {e}", "type": "server_error"}
                    yield {"data": json.dumps({"error": {**err, "param": None, "code": None}})}
                    return
            if include_usage:
                yield event([], self.usage(req))
            yield {"data": "[DONE]"}

        return EventSourceResponse(generator(), ping=15)


def create_app(
    model: DeepSeekModel,
    model_name: str = "deepwhale",
    *,
    data_dir: str | PathLike | None = None,
    auth: bool = False,
    audit: bool | None = None,
    audit_prompts: bool = False,
) -> FastAPI:
    """Build the FastAPI app serving ``model`` under ``model_name``.

    Args:
        model: a loaded :class:`~deepwhale.api.DeepSeekModel` with a tokenizer; its engine (with
            the batch size set by ``model.set_batch_size``) is started when the app starts and
            shut down when it stops.
        model_name: the id clients pass as ``model`` and ``/v1/models`` lists.
        data_dir: folder of ``keys.sqlite`` and ``audit.sqlite`` (default: ``$DEEPWHALE_HOME``,
            else ``~/.deepwhale``; see :func:`~deepwhale.serve.auth.data_home`).
        auth: require API keys (off by default for library use; ``deepwhale serve`` turns it
            on unless ``--no-auth``). Off logs a WARNING.
        audit: append every request to ``audit.sqlite`` (default: on when ``data_dir`` is given).
        audit_prompts: also store prompt text in the audit log (off: counts only).

    Returns:
        The :class:`fastapi.FastAPI` app (run it with uvicorn).

    Raises:
        ValueError: the model has no tokenizer.
        OSError: the data folder cannot be created.
    """
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: no tokenizer.json; serving needs one")
    server = _Server(model, model_name)
    audit = data_dir is not None if audit is None else audit
    home = data_home(data_dir) if auth or audit else None
    if not auth:
        logger.warning(
            "!!! API key authentication is OFF: anyone who can reach this server can use it !!!"
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine = model.engine
        engine.start()
        try:
            yield
        finally:
            for req in list(server.active):
                engine.cancel(req)
            engine.shutdown()

    app = FastAPI(title="deepwhale", version="0.1.0", lifespan=lifespan, redirect_slashes=False)
    app.state.server = server
    _install_error_handlers(app)
    app.add_middleware(_BodyLimitMiddleware, limit=MAX_BODY_BYTES)  # inside auth: keys first
    if auth:
        _install_auth(app, KeyStore(home / KEYS_FILE))
    routes = {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/dashboard",
        "/dashboard/stats",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }

    app.add_middleware(_CountMiddleware, metrics=server.metrics, routes=frozenset(routes))

    if audit:  # outermost, so it records the final status and the time to the last byte
        app.add_middleware(_AuditMiddleware, log=AuditLog(home / AUDIT_FILE), prompts=audit_prompts)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition of the server's metrics."""
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """A live HTML page charting throughput and latency from ``/dashboard/stats``.

        The page itself holds no data and needs no key; it asks for a ``viewer`` or ``admin``
        key when ``/dashboard/stats`` answers 401/403, and keeps it in the tab's sessionStorage.
        """
        return HTMLResponse(_DASHBOARD_HTML, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/stats")
    async def dashboard_stats() -> dict:
        """Per-second tokens, requests and latency percentiles of the last 300 s (see
        :meth:`deepwhale.serve.stats.LiveStats.snapshot`), plus the model name."""
        return {"model": model_name, **server.stats.snapshot()}

    @app.get("/health")
    async def health() -> dict:
        """Liveness, with the engine's free slots and waiting requests."""
        engine = model.engine
        return {
            "status": "ok",
            "model": model_name,
            "free_slots": len(engine.free_slots),
            "waiting": len(engine.waiting),
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        """OpenAI ``GET /v1/models``: the one model served, if the caller's key may use it."""
        key = getattr(request.state, "api_key", None)
        if key is not None and not key.allows_model(model_name):
            return {"object": "list", "data": []}
        card = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "deepwhale",
            "max_model_len": model.engine.max_seq_len,  # vLLM's field: the context, tokens
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI ``POST /v1/completions``: one prompt or a list (strings or token ids)."""
        server.authorize(request, body.model, body.prompt)
        server.check_model(body.model)
        prompts = body.prompts()
        if body.stream and len(prompts) > 1:
            raise APIError("stream is supported with one prompt only", param="stream")
        ids_list = await server.encode_prompts(request, prompts)
        budgets = [server.budget(ids, body.max_tokens, "max_tokens", body.echo) for ids in ids_list]
        samplings = [server.sampling(body, max(b, 1)) for b in budgets]
        reqs = [
            server.submit(ids, body.n, body.logprobs, sampling) if b else None
            for ids, b, sampling in zip(ids_list, budgets, samplings, strict=True)
        ]
        live = [r for r in reqs if r is not None]
        if len(reqs) == 1 and live:
            request.state.audit_request = live[0]
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return server.stream(
                request, live[0], "text_completion", False, include, body.logprobs is not None
            )
        echoed = [None] * len(reqs)
        if body.echo and body.logprobs is not None:
            echoed = [
                await asyncio.to_thread(prompt_logprobs, model.module, ids, body.logprobs)
                for ids in ids_list
            ]
        if live:
            await server.drain(live, request)
        choices, generated = [], 0
        for i, (prompt, ids, req) in enumerate(zip(prompts, ids_list, reqs, strict=True)):
            head = ""
            if body.echo:
                head = prompt if isinstance(prompt, str) else model.tokenizer.decode(ids)
            samples = (
                [(j, None, "") for j in range(body.n)]
                if req is None
                else [(s.index, s, t) for s, t in zip(req.sequences, req.texts(), strict=True)]
            )
            generated += 0 if req is None else req.num_generated
            for j, seq, text in samples:
                lp = None
                if body.logprobs is not None:
                    lps = [] if seq is None else seq.logprobs
                    offsets = [] if seq is None else server.text_offsets(ids, lps)
                    lp = server.completion_logprobs(lps, offsets)
                    if body.echo:
                        pre = server.echo_logprobs(ids, echoed[i])
                        lp = {
                            k: pre[k] + lp[k] for k in ("tokens", "token_logprobs", "top_logprobs")
                        } | {"text_offset": pre["text_offset"] + [o + len(head) for o in offsets]}
                choices.append(
                    {
                        "index": i * body.n + j,
                        "text": head + text,
                        "logprobs": lp,
                        "finish_reason": "length" if seq is None else seq.finish_reason,
                    }
                )
        prompt_tokens = sum(len(ids) for ids in ids_list)
        request.state.audit_completion_tokens = generated
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated,
            },
        }

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        """vLLM's ``GET /tokenizer_info``: special tokens, chat template and context, so
        lm-eval's ``tokenizer_backend=remote`` (and ``auto``) needs no local tokenizer."""
        tok = model.tokenizer
        return {
            "tokenizer_class": "deepwhale.tokenizer.Tokenizer",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": tok.add_bos_token,
            "chat_template": tok.chat_template,
            "model_max_length": model.engine.max_seq_len,
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> dict:
        """vLLM's ``POST /tokenize``: ``{tokens, count, max_model_len}`` of ``prompt``."""
        server.authorize(request, body.model, body.prompt)
        server.check_model(body.model)
        tok = model.tokenizer
        ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
        """vLLM's ``POST /detokenize``: the text of ``tokens`` (special tokens kept)."""
        server.check_model(body.model)
        vocab = model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI ``POST /v1/chat/completions`` through the model's chat template."""
        messages = [_message(m) for m in body.messages]
        server.authorize(request, body.model, messages)
        server.check_model(body.model)
        if not model.tokenizer.chat_templates:
            raise APIError(
                f"the model '{model_name}' has no chat template; use /v1/completions with a "
                "plain text prompt",
                param="messages",
                code="no_chat_template",
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        ids = await server.encode(request, messages)
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        sampling = server.sampling(body, server.budget(ids, max_tokens, "max_tokens"))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        req = server.submit(ids, body.n, logprobs, sampling)
        request.state.audit_request = req
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return server.stream(
                request, req, "chat.completion.chunk", True, include, body.logprobs
            )
        await server.drain(req, request)
        choices = []
        for seq, text in zip(req.sequences, req.texts(), strict=True):
            choices.append(
                {
                    "index": seq.index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": server.chat_logprobs(seq.logprobs) if body.logprobs else None,
                    "finish_reason": seq.finish_reason,
                }
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": server.usage(req),
        }

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> dict:
        """DeepSeek's FastAPI example: ``{prompt, max_length, ...}`` -> ``{output, usage}``;
        ``max_length`` counts the prompt, like :func:`deepwhale.api.generate_text`."""
        server.authorize(request, None, body.prompt)
        if not body.prompt:
            raise APIError("prompt must not be empty", param="prompt")
        ids = await server.encode(request, body.prompt)
        if body.max_new_tokens is not None:
            new, param = body.max_new_tokens, "max_new_tokens"
        else:
            new, param = body.max_length - len(ids), "max_length"
            if new < 1:
                raise PromptTooLongError(
                    f"the prompt is {len(ids)} tokens, which leaves nothing of "
                    f"max_length={body.max_length}"
                )
        sampling = server.sampling(body, server.budget(ids, new, param))
        req = server.submit(ids, 1, None, sampling)
        request.state.audit_request = req
        await server.drain(req, request)
        return {"output": req.texts()[0], "usage": server.usage(req)}

    return app


def _install_auth(app: FastAPI, keys: KeyStore) -> None:
    """Check the API key of every request against ``keys`` (see :class:`_AuthMiddleware`)."""
    app.add_middleware(_AuthMiddleware, keys=keys)


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


class _InternalErrorMiddleware:
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


class _CountMiddleware:
    """Request latency (to the last byte, so streams count in full) and requests by route and
    status, into the server's Prometheus metrics. Unknown paths count as route ``other``."""

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
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()


class _AuthMiddleware:
    """API keys, roles and rate limits (see :mod:`deepwhale.serve.auth`).

    401 ``invalid_api_key`` (with ``WWW-Authenticate: Bearer``, RFC 6750) for a missing, unknown
    or revoked key; 403 ``insufficient_permissions`` for a role not allowed on the route; 429
    ``rate_limit_exceeded`` with ``Retry-After`` in seconds (RFC 6585 section 4) past the key's
    requests per minute. The key is left in ``request.state.api_key`` for the routes and audit.
    """

    def __init__(self, app, keys: KeyStore) -> None:
        self.app, self.keys, self.limiter = app, keys, RateLimiter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self.check(scope)
        if response is None:
            await self.app(scope, receive, send)
        else:
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
        retry = self.limiter.check(key.id, key.rate_limit)
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


class _AuditMiddleware:
    """Pure ASGI middleware appending one audit row per HTTP request once its last byte is
    sent (streams included), with the status sent and the latency in milliseconds. Routes leave
    the model, prompt, prompt token count and engine request in ``request.state`` (``audit_*``);
    ``audit_status`` overrides the status sent (499 for a stream the client closed). Requests
    refused before a route runs (401, 403, 429, 413) have no model."""

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


class _BodyLimitMiddleware:
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
                await too_big(scope, receive, send)
                return
        pending = (
            [first] if chunks is None else [{"type": "http.request", "body": b"".join(chunks)}]
        )

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _merge(batch: list[tuple[int, GenerationChunk]]) -> list[tuple[int, GenerationChunk]]:
    """Join consecutive chunks of the same sample into one (texts concatenated, the last
    token id and finish reason kept); used when no per-token logprobs are streamed."""
    out: list[tuple[int, GenerationChunk]] = []
    for i, chunk in batch:
        if out and out[-1][0] == i and out[-1][1].finish_reason is None:
            prev = out[-1][1]
            out[-1] = (
                i,
                GenerationChunk(prev.text + chunk.text, chunk.token_id, chunk.finish_reason),
            )
        else:
            out.append((i, chunk))
    return out


def _message(m) -> dict:
    """A chat message as the template expects it; text parts of list content are joined."""
    content = m.content
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    out = {"role": m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    return out
