"""Live quality monitoring of a streaming run: per-window reports, Prometheus metrics, alerts.

While a streaming pipeline runs, a thread in the launching process reads the stage counters
every ``window_s`` seconds. These are the counter files that every worker rewrites at the end of
each bundle (:mod:`deepwhale.data.metrics`). The thread turns what changed since the last read
into a window report, ``<output>/monitor/window-<start>.json``, written atomically. A report
holds:

- the documents in and out, and the drop rate;
- the drops by stage and reason;
- the perplexity histogram (the ``perplexity`` stage counts each score into the buckets of
  :data:`PPL_BUCKETS`) and the median estimated from it;
- the language mix (``langid`` counts each detected language);
- ``alerts``: the band rules (``streaming.alerts``) that the window broke.

``<output>/monitor/live.json`` holds the last :data:`KEEP_WINDOWS` windows and the running totals.
``deepwhale data monitor OUT_DIR`` draws it (:mod:`deepwhale.data.monitor_view`). With
``streaming.metrics_port`` set, the same figures are served on
``http://127.0.0.1:<port>/metrics`` (prometheus-client's own HTTP server; port 0 picks a free
one, and ``monitor/endpoint.json`` names the URL) for Prometheus to scrape:

- ``deepwhale_data_documents_total{stage, outcome}``;
- ``deepwhale_data_dropped_total{stage, reason}``;
- the ``deepwhale_data_perplexity`` histogram;
- ``deepwhale_data_language_documents_total{lang}``;
- the last window's ``deepwhale_data_window_drop_rate``, ``deepwhale_data_window_ppl_median`` and
  ``deepwhale_data_window_alerts``.

Windows here are wall-clock intervals of the launching process, in epoch seconds. They are not
Beam's event-time windows. The in-process runners give the two the same length, but Beam fires
its windows late.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from pathlib import Path

from deepwhale.atomic import write_json
from deepwhale.data.alerts import check_alerts
from deepwhale.data.metrics import read_sink

#: perplexity histogram bucket upper edges (``le``), log-spaced; the last is +inf
PPL_BUCKETS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, math.inf)
#: windows kept in ``live.json``
KEEP_WINDOWS = 60


def ppl_bucket(ppl: float) -> str:
    """The counter name of the histogram bucket of ``ppl``: ``ppl_le_<edge>`` (``ppl_le_inf``)."""
    edge = PPL_BUCKETS[bisect.bisect_left(PPL_BUCKETS, ppl)]
    return "ppl_le_inf" if math.isinf(edge) else f"ppl_le_{edge:g}"


def _edge(name: str) -> float:
    return math.inf if name == "ppl_le_inf" else float(name.removeprefix("ppl_le_"))


def histogram_median(hist: dict[str, int]) -> float | None:
    """The median of a ``{ppl_le_<edge>: count}`` histogram, interpolated linearly within its
    bucket (the open last bucket gives its lower edge); None when empty."""
    items = sorted((_edge(k), v) for k, v in hist.items() if v > 0)
    total = sum(v for _, v in items)
    if not total:
        return None
    half, seen = total / 2, 0
    for edge, count in items:
        i = PPL_BUCKETS.index(edge)
        lo = PPL_BUCKETS[i - 1] if i else 0.0  # the bucket is (lo, edge]
        if seen + count >= half:
            return lo if math.isinf(edge) else lo + (edge - lo) * (half - seen) / count
        seen += count
    return None  # not reached: the counts add up to total


def _minus(now: dict, before: dict) -> dict:
    """``now - before`` for nested counter dicts (only the non-zero differences)."""
    out: dict = {}
    for key, value in now.items():
        if isinstance(value, dict):
            sub = _minus(value, before.get(key, {}))
            if sub:
                out[key] = sub
        elif value - before.get(key, 0):
            out[key] = value - before.get(key, 0)
    return out


def summarize(counters: dict, stage_order: list[str]) -> dict:
    """The monitored figures of a counter dict (:func:`~deepwhale.data.metrics.collect`'s
    shape, totals or one window's differences): ``docs_in``, ``docs_out``, ``drop_rate``,
    ``dropped`` (``{"stage.reason": n}``), ``perplexity`` (``histogram``, ``median``) and
    ``languages`` (``{code: n}``)."""
    docs_in = counters.get("read", {}).get("docs", 0)
    docs_out = counters.get("output", {}).get("kept", 0)
    dropped, hist, langs = {}, {}, {}
    for stage in stage_order:
        c = counters.get(stage, {})
        for reason, n in c.get("dropped", {}).items():
            dropped[f"{stage}.{reason}"] = n
        for name, n in c.items():
            if name.startswith("ppl_le_"):
                hist[name] = hist.get(name, 0) + n
            elif name.startswith("lang."):
                langs[name[5:]] = langs.get(name[5:], 0) + n
    seen = docs_in or (counters.get(stage_order[0], {}).get("in", 0) if stage_order else 0)
    return {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "drop_rate": round(1 - docs_out / seen, 6) if seen else None,
        "dropped": dropped,
        "perplexity": {"histogram": hist, "median": histogram_median(hist)},
        "languages": langs,
    }


class WindowMonitor:
    """The monitoring thread of one streaming run (see the module docstring).

    Args:
        sink: the run's counter-file folder.
        out_dir: the run's output folder (``monitor/`` is written there).
        stage_order: the configured stages' names.
        window_s: seconds per window.
        alerts: band rules, ``{"ppl_median" | "drop_rate": [lo, hi]}``.
        metrics_port: serve Prometheus metrics on ``127.0.0.1:<port>`` (None: not served; 0:
            any free port, then read :attr:`port`).

    Raises:
        OSError: the metrics port is taken (raised by :meth:`start`).
    """

    def __init__(
        self,
        sink: Path,
        out_dir: Path,
        stage_order: list[str],
        window_s: float,
        alerts: dict | None = None,
        metrics_port: int | None = None,
    ):
        self.sink, self.folder = Path(sink), Path(out_dir) / "monitor"
        self.stage_order, self.window_s = stage_order, window_s
        self.alerts, self.metrics_port = dict(alerts or {}), metrics_port
        self.port: int | None = None
        self.totals: dict = {}
        self.windows: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server = None
        self._t0 = time.time()

    def start(self) -> WindowMonitor:
        """Start the thread (and the metrics server)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.metrics_port is not None:
            self._serve_metrics()
        self._thread = threading.Thread(target=self._loop, name="deepwhale-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Record the last (partial) window, stop the thread and the metrics server."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.tick()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _loop(self) -> None:
        while not self._stop.wait(self.window_s):
            self.tick()

    def tick(self) -> dict | None:
        """Read the counters; write the window that ends now if anything happened in it."""
        t1 = time.time()
        try:
            now = read_sink(self.sink) if self.sink.exists() else {}
        except ValueError:  # a file being replaced: read it next time
            return None
        delta = _minus(now, self.totals)
        t0, self._t0, self.totals = self._t0, t1, now
        if not delta:
            return None
        window = {"window": [round(t0, 3), round(t1, 3)], **summarize(delta, self.stage_order)}
        window["alerts"] = check_alerts(window, self.alerts)
        self.windows = [*self.windows, window][-KEEP_WINDOWS:]
        write_json(self.folder / f"window-{t0:014.3f}.json", window)
        live = {
            "window_s": self.window_s,
            "alerts_bands": self.alerts,
            "windows": self.windows,
            "totals": summarize(now, self.stage_order),
        }
        write_json(self.folder / "live.json", live)
        return window

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        registry.register(_Collector(self))
        self._server, _ = start_http_server(self.metrics_port, "127.0.0.1", registry)
        self.port = self._server.server_port
        url = f"http://127.0.0.1:{self.port}/metrics"  # port 0 picks one: say which
        write_json(self.folder / "endpoint.json", {"metrics": url})


class _Collector:
    """prometheus-client collector over a :class:`WindowMonitor`'s latest totals."""

    def __init__(self, monitor: WindowMonitor):
        self.m = monitor

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        totals = self.m.totals
        docs = CounterMetricFamily(
            "deepwhale_data_documents", "Documents per stage", labels=["stage", "outcome"]
        )
        dropped = CounterMetricFamily(
            "deepwhale_data_dropped", "Documents dropped", labels=["stage", "reason"]
        )
        for stage in self.m.stage_order:
            c = totals.get(stage, {})
            for outcome in ("in", "kept"):
                docs.add_metric([stage, outcome], c.get(outcome, 0))
            for reason, n in c.get("dropped", {}).items():
                dropped.add_metric([stage, reason], n)
        summary = summarize(totals, self.m.stage_order)
        hist = summary["perplexity"]["histogram"]
        buckets, running = [], 0
        for edge in PPL_BUCKETS:
            running += hist.get(ppl_bucket(edge), 0)
            buckets.append(("+Inf" if math.isinf(edge) else f"{edge:g}", running))
        ppl = HistogramMetricFamily(
            "deepwhale_data_perplexity",
            "Perplexity of the scored documents (sum not tracked: NaN)",
            buckets=buckets,
            sum_value=math.nan,
        )
        langs = CounterMetricFamily(
            "deepwhale_data_language_documents", "Documents per language", labels=["lang"]
        )
        for code, n in summary["languages"].items():
            langs.add_metric([code], n)
        yield from (docs, dropped, ppl, langs)
        last = self.m.windows[-1] if self.m.windows else None
        for name, value in (
            ("drop_rate", last and last["drop_rate"]),
            ("ppl_median", last and last["perplexity"]["median"]),
            ("alerts", last and len(last["alerts"])),
        ):
            yield GaugeMetricFamily(
                f"deepwhale_data_window_{name}",
                f"The last window's {name.replace('_', ' ')}",
                value=math.nan if value is None else value,
            )
