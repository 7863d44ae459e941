"""Helpers shared by the serving tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx


def wait_for_health(
    base: str, timeout: float = 30, alive: Callable[[], bool] | None = None
) -> None:
    """Poll ``{base}/health`` until it answers 200; fail after ``timeout`` seconds or as soon as
    ``alive()`` (e.g. "the server process still runs") returns False."""
    deadline = time.monotonic() + timeout
    while True:
        assert alive is None or alive(), "the server exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server did not start in {timeout:.0f} s"
        time.sleep(0.05)


def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yields the base
    URL once ``/health`` answers, stops the server afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_for_health(base)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
