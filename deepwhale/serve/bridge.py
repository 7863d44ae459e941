"""The async bridge between the engine's scheduler thread and the event loop.

The :class:`~deepwhale.inference.engine.Engine` runs its scheduler in a background thread and
hands each request's chunks to a sink (:meth:`~deepwhale.inference.engine.Request.on_output`); the
sink here puts them on an ``asyncio.Queue`` with ``loop.call_soon_threadsafe``, so the event loop
never blocks and there is no thread per request. A consumer that stops early (client disconnect,
error) cancels its engine request, which frees its cache slots. Token timings go to the server's
Prometheus metrics and live stats.

Imports only the inference layer and :mod:`deepwhale.serve.errors`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request

from deepwhale.inference.engine import Engine
from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.inference.generate import GenerationChunk
from deepwhale.serve.errors import APIError
from deepwhale.serve.metrics import Metrics
from deepwhale.serve.stats import LiveStats

_END = object()


class EngineBridge:
    """Streams engine requests into coroutines and keeps the set of those in flight.

    Args:
        engine: returns the model's engine (made lazily, so a callable).
        metrics: receives time to first token, inter-token latency and token counts.
        stats: receives one ``token()`` per token and one ``request()`` per finished request.
    """

    def __init__(self, engine: Callable[[], Engine], metrics: Metrics, stats: LiveStats) -> None:
        self.engine, self.metrics, self.stats = engine, metrics, stats
        #: engine requests being consumed now (cancelled when the app stops)
        self.active: set[EngineRequest] = set()

    def cancel_all(self) -> None:
        """Cancel every request in flight (the app is shutting down)."""
        for req in list(self.active):
            self.engine().cancel(req)

    async def events(self, req: EngineRequest) -> AsyncIterator[list[tuple[int, GenerationChunk]]]:
        """Yield lists of ``(index, chunk)`` from the engine without blocking the loop: every
        item that arrived since the consumer last asked (one item when it keeps up; several
        when the engine runs ahead, so a slow consumer sends fewer, larger SSE events). The
        engine request is cancelled if the consumer stops early (client disconnect, error);
        an engine failure is raised here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:  # engine thread: hand over to the event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, _END if item is None else item)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

        self.active.add(req)
        req.on_output(sink)
        clock = _TokenClock(self.metrics, self.stats)
        ok = False
        try:
            done = False
            while not done:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                if _END in items:
                    done = True
                    items = items[: items.index(_END)]
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item[1].token_id is not None:
                        clock.token()
                if items:
                    yield items
            ok = True
        except (GeneratorExit, asyncio.CancelledError):
            ok = True  # the client went away: not a server error
            raise
        finally:
            self.active.discard(req)
            if not req.finished:
                self.engine().cancel(req)
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
            self.metrics.generated_tokens.inc(req.num_generated)
            self.stats.request(time.perf_counter() - clock.start, clock.ttft, ok)

    async def drain(self, reqs: list[EngineRequest], request: Request) -> None:
        """Wait until every engine request in ``reqs`` finished (non-streaming responses).

        Raises:
            APIError: 499 ``client_closed_request`` if the client disconnects first (the engine
                requests are cancelled, their slots freed).
            Exception: the engine's failure, re-raised.
        """

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


class _TokenClock:
    """Per-request token timing: the first token observes time to first token, later ones the
    inter-token latency (seconds, ``time.perf_counter``)."""

    def __init__(self, metrics: Metrics, stats: LiveStats) -> None:
        self.metrics, self.stats = metrics, stats
        self.start = self.last = time.perf_counter()
        self.ttft: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
            self.metrics.ttft.observe(self.ttft)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.stats.token()
