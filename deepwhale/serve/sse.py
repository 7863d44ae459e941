"""Server-sent events: one engine request as a stream of OpenAI chunk objects.

The stream is ``data: {chunk}`` events ending in ``data: [DONE]``
(https://platform.openai.com/docs/api-reference/completions/create, ``stream``); with
``stream_options.include_usage`` every chunk carries ``"usage": null`` and a last chunk with empty
``choices`` carries the request's ``usage``. An engine failure mid-stream is sent as one
``{"error": ...}`` event and ends the stream. Each endpoint supplies how one choice looks
(:mod:`deepwhale.serve.serving_completions`, :mod:`deepwhale.serve.serving_chat`).
:func:`stream_typed_events` streams the Responses API's typed events instead
(:mod:`deepwhale.serve.serving_responses`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from fastapi import Request
from sse_starlette import EventSourceResponse

from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.inference.generate import GenerationChunk
from deepwhale.serve.bridge import EngineBridge
from deepwhale.serve.errors import APIError
from deepwhale.serve.serving import usage

#: builds one streamed choice from ``(sample index, chunk)``; None: nothing to send for it
ChoiceFn = Callable[[int, GenerationChunk], dict | None]


def merge_chunks(batch: list[tuple[int, GenerationChunk]]) -> list[tuple[int, GenerationChunk]]:
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


def _worth_sending(chunk: GenerationChunk, logprobs: bool) -> bool:
    if chunk.finish_reason == "cancelled":
        return False
    return bool(chunk.text or chunk.finish_reason or (logprobs and chunk.logprobs))


def stream_response(
    bridge: EngineBridge,
    request: Request,
    req: EngineRequest,
    *,
    obj: str,
    model_name: str,
    choice: ChoiceFn,
    first_choices: Sequence[dict] = (),
    include_usage: bool = False,
    logprobs: bool = False,
    usage_fn: Callable[[EngineRequest], dict] = usage,
) -> EventSourceResponse:
    """SSE response of ``obj`` chunks (``text_completion`` or ``chat.completion.chunk``) for
    ``req``, ending with ``data: [DONE]``.

    Args:
        choice: formats one choice of a chunk; called once per chunk worth sending, in order;
            None skips it (e.g. text held back by a parser). An :class:`APIError` it raises
            is sent as that error's ``{"error": ...}`` event and ends the stream.
        first_choices: choices sent one per event before any token (chat's role deltas).
        include_usage: add ``usage`` (null, then the request's totals in a last chunk).
        logprobs: chunks carry logprobs, so they are sent one token each (not merged).
        usage_fn: the last chunk's ``usage`` of the finished request.

    A client disconnect makes sse-starlette cancel the generator; the ``CancelledError``
    unwinds through :meth:`EngineBridge.events`, whose ``finally`` cancels the engine request,
    and ``request.state.audit_status`` is set to 499 for the audit log.
    """
    rid = f"{'chatcmpl' if obj.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(choices: list[dict], usage_body: dict | None = None) -> dict:
        body = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model_name,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage_body
        return {"data": json.dumps(body, ensure_ascii=False)}

    async def body():
        async with aclosing(bridge.events(req)) as events:
            for first in first_choices:
                yield event([first])
            try:
                async for batch in events:
                    for i, chunk in batch if logprobs else merge_chunks(batch):
                        if _worth_sending(chunk, logprobs):
                            c = choice(i, chunk)
                            if c is not None:
                                yield event([c])
            except APIError as e:  # the answer broke a request rule (e.g. tool_call_missing)
                err = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
                yield {"data": json.dumps({"error": err}, ensure_ascii=False)}
                return
            except Exception as e:  # the engine failed mid-stream: tell the client, then stop
                err = {"message": f"{type(e).__name__}: {e}", "type": "server_error"}
                yield {"data": json.dumps({"error": {**err, "param": None, "code": None}})}
                return
        if include_usage:
            yield event([], usage_fn(req))
        yield {"data": "[DONE]"}

    return _event_source(request, body())


def _event_source(request: Request, events: AsyncIterator[dict]) -> EventSourceResponse:
    """The SSE response of ``events`` (sse-starlette event dicts); a client leaving mid-stream
    is noted as status 499 for the audit log."""

    async def generator():
        try:
            async for item in events:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            request.state.audit_status = 499  # the client left mid-stream
            raise

    return EventSourceResponse(generator(), ping=15)


def stream_typed_events(
    bridge: EngineBridge,
    request: Request,
    req: EngineRequest,
    *,
    head: Sequence[dict],
    delta: Callable[[str], list[dict]],
    tail: Callable[[], list[dict]],
) -> EventSourceResponse:
    """SSE of typed events, the Responses API's stream
    (https://platform.openai.com/docs/api-reference/responses-streaming): each event is
    ``event: <type>`` plus ``data: {"type": <type>, ..., "sequence_number": k}``, ``k``
    counting from 0; there is no ``[DONE]``.

    Args:
        head: events sent before any token.
        delta: the events of one piece of new text (one sample's merged chunks).
        tail: the closing events, built once the request has finished.

    An engine failure mid-stream is sent as one ``error`` event (``{type, code, message,
    param}``) and ends the stream. A client disconnect cancels the engine request as in
    :func:`stream_response`.
    """
    numbers = itertools.count()

    def event(body: dict) -> dict:
        body = {**body, "sequence_number": next(numbers)}
        return {"event": body["type"], "data": json.dumps(body, ensure_ascii=False)}

    async def body():
        async with aclosing(bridge.events(req)) as events:
            for e in head:
                yield event(e)
            try:
                async for batch in events:
                    for _, chunk in merge_chunks(batch):
                        if chunk.text and chunk.finish_reason != "cancelled":
                            for e in delta(chunk.text):
                                yield event(e)
            except Exception as e:  # the engine failed mid-stream: tell the client, then stop
                message = f"{type(e).__name__}: {e}"
                yield event(
                    {"type": "error", "code": "server_error", "message": message, "param": None}
                )
                return
        for e in tail():
            yield event(e)

    return _event_source(request, body())
