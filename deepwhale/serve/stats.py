"""Live per-second statistics for the ``/dashboard`` page.

Prometheus histograms (:mod:`deepwhale.serve.metrics`) are cumulative and made for a scraper;
the dashboard wants a short time series it can chart without one. :class:`LiveStats` keeps one
bucket per wall-clock second for the last ``window_s`` seconds: tokens generated in that second,
requests finished (and failed) in it, and their end-to-end latencies and times to first token.
All methods are called on the server's event loop; a lock still guards them so a snapshot from
another thread is safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Second:
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by the nearest-rank method; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LiveStats:
    """Rolling one-second buckets of serving activity.

    Args:
        gauges: returns ``(running, waiting)``: sequences in the batch and requests queued.
        window_s: seconds of history kept (and returned by :meth:`snapshot`).
        clock: wall clock in seconds (``time.time``); injectable for tests.
    """

    def __init__(
        self,
        gauges: Callable[[], tuple[int, int]],
        window_s: int = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gauges, self.window_s, self.clock = gauges, window_s, clock
        self.started = clock()
        self.total_requests = self.total_errors = self.total_tokens = 0
        self._buckets: dict[int, _Second] = {}
        self._lock = threading.Lock()

    def _bucket(self) -> _Second:
        now = int(self.clock())
        b = self._buckets.get(now)
        if b is None:
            b = self._buckets[now] = _Second()
            for t in [t for t in self._buckets if t <= now - self.window_s]:
                del self._buckets[t]
        return b

    def token(self, n: int = 1) -> None:
        """Count ``n`` tokens generated now."""
        with self._lock:
            self._bucket().tokens += n
            self.total_tokens += n

    def request(self, latency_s: float, ttft_s: float | None, ok: bool) -> None:
        """Record a finished generation request.

        Args:
            latency_s: seconds from submission to the last token.
            ttft_s: seconds from submission to the first token (None if none came).
            ok: False if it failed (engine error); cancelled requests count as ok.
        """
        with self._lock:
            b = self._bucket()
            b.requests += 1
            self.total_requests += 1
            b.latency_s.append(latency_s)
            if ttft_s is not None:
                b.ttft_s.append(ttft_s)
            if not ok:
                b.errors += 1
                self.total_errors += 1

    def snapshot(self) -> dict:
        """The last ``window_s`` seconds as JSON-ready data.

        Returns:
            ``{"now", "uptime_s", "window_s", "running", "waiting", "totals": {requests,
            errors, tokens}, "recent": {...}, "series": [...]}``. ``series`` has one entry per
            second, oldest first: ``t`` (unix seconds), ``tokens`` (tokens/s), ``requests``,
            ``errors``, ``latency_p50_ms``, ``latency_p95_ms``, ``ttft_p50_ms`` (null when no
            request finished that second). ``recent`` averages the last 10 seconds:
            ``tokens_per_s``, ``requests_per_s``, ``latency_p50_ms``, ``latency_p95_ms``,
            ``ttft_p50_ms``.
        """
        running, waiting = self.gauges()
        with self._lock:
            now = int(self.clock())
            series, lat10, ttft10, tok10, req10 = [], [], [], 0, 0
            for t in range(now - self.window_s + 1, now + 1):
                b = self._buckets.get(t) or _Second()
                series.append(
                    {
                        "t": t,
                        "tokens": b.tokens,
                        "requests": b.requests,
                        "errors": b.errors,
                        "latency_p50_ms": _ms(percentile(b.latency_s, 50)),
                        "latency_p95_ms": _ms(percentile(b.latency_s, 95)),
                        "ttft_p50_ms": _ms(percentile(b.ttft_s, 50)),
                    }
                )
                if t > now - 10:
                    lat10 += b.latency_s
                    ttft10 += b.ttft_s
                    tok10 += b.tokens
                    req10 += b.requests
            span = min(10.0, max(1.0, self.clock() - self.started))
            return {
                "now": self.clock(),
                "uptime_s": self.clock() - self.started,
                "window_s": self.window_s,
                "running": running,
                "waiting": waiting,
                "totals": {
                    "requests": self.total_requests,
                    "errors": self.total_errors,
                    "tokens": self.total_tokens,
                },
                "recent": {
                    "tokens_per_s": tok10 / span,
                    "requests_per_s": req10 / span,
                    "latency_p50_ms": _ms(percentile(lat10, 50)),
                    "latency_p95_ms": _ms(percentile(lat10, 95)),
                    "ttft_p50_ms": _ms(percentile(ttft10, 50)),
                },
                "series": series,
            }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
