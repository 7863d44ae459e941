"""Helpers shared by the serving tests."""

from __future__ import annotations

import time
from collections.abc import Callable

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
