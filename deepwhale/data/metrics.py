"""Per-stage kept / dropped counters, on Beam Metrics and on files, and reading them back.

Every stage counts under the namespace ``deepwhale.data.<stage>``: ``in`` (documents seen),
``kept`` (passed on) and ``dropped.<reason>`` (one counter per reason). :func:`collect` turns
them into a plain dict for the report.

Two paths carry the counts, so the report is the same on every runner:

* **Beam Metrics**, which the runner aggregates across workers (FnApiRunner, Flink, Spark,
  Dataflow);
* **counter files**, for runners whose result has no metrics (Beam's ``DaskRunner`` raises
  ``NotImplementedError`` from ``metrics()`` as of Beam 2.78). While a sink folder is set
  (:func:`set_sink`, done by :func:`deepwhale.data.pipeline.run`), each worker process keeps
  its running totals in memory and, at the end of every bundle of a :class:`CountingDoFn`,
  rewrites ``<sink>/<host>-<pid>-<token>.json`` atomically with them; :func:`read_sink` sums
  the files. The sink must be a folder every worker can write (the output folder is one
  already, as the shards are written there). Like Beam's *attempted* metrics, this path
  counts every execution of a bundle: Beam 2.78's Dask runner computes a side input
  (``minhash_dedup``'s dropped ids, ``perplexity``'s ``keep_percentile`` cutoff) in a nested
  ``compute`` that runs the stages before it again, so on that runner their counters can
  exceed the documents (the report's ``counters_note`` says so; shards are unaffected).

A DoFn that counts (a plugin stage's included) inherits :class:`CountingDoFn`, and calls
``super().finish_bundle()`` if it defines its own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections import defaultdict
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics

PREFIX = "deepwhale.data."

_SINK: str | None = None  # the sink folder counters made from now on write to
_PID = os.getpid()
_TOKEN = uuid.uuid4().hex[:12]
# this process's running totals: {sink: {namespace: {name: value}}}
_LOCAL: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
_DIRTY: set = set()
_LOCK = threading.Lock()  # Dask runs several tasks of one process in threads


def set_sink(folder: str | os.PathLike | None) -> None:
    """Make counters created from now on also count into files under ``folder``
    (an absolute path; None stops it). Counters pickled into DoFns keep the folder they
    were created with, so workers write where the launching process said."""
    global _SINK
    _SINK = None if folder is None else str(Path(folder).resolve())


def _local() -> dict:
    """This process's totals; reset in a forked child so the parent's are not counted twice."""
    global _PID, _TOKEN
    if os.getpid() != _PID:
        _PID, _TOKEN = os.getpid(), uuid.uuid4().hex[:12]
        _LOCAL.clear()
        _DIRTY.clear()
    return _LOCAL


class Counter:
    """One counter: a Beam Metrics counter, plus this process's total for the sink folder.

    Args:
        namespace: ``deepwhale.data.<stage>``.
        name: the counter's name (``in``, ``kept``, ``dropped.<reason>``...).
    """

    def __init__(self, namespace: str, name: str):
        self.namespace, self.name, self.sink = namespace, name, _SINK
        self.beam = Metrics.counter(namespace, name)

    def inc(self, n: int = 1) -> None:
        """Add ``n`` (a count of documents, files, ...)."""
        self.beam.inc(n)
        if self.sink is not None:
            with _LOCK:
                _local()[self.sink][self.namespace][self.name] += n
            _DIRTY.add(self.sink)


def counter(namespace: str, name: str) -> Counter:
    """A :class:`Counter` under ``namespace`` (``deepwhale.data.<stage>``) named ``name``."""
    return Counter(namespace, name)


def flush() -> None:
    """Write this process's totals of every sink counted into since the last flush
    (one small JSON file per process and sink, replaced atomically)."""
    from deepwhale.atomic import write_json

    local = _local()
    for sink in list(_DIRTY):
        folder = Path(sink)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{_TOKEN}.json"
        with _LOCK:
            totals = {ns: dict(c) for ns, c in local[sink].items()}
        write_json(folder / name, {"totals": totals})
        _DIRTY.discard(sink)


class CountingDoFn(beam.DoFn):
    """A DoFn whose counters reach the report on every runner: it flushes the counter files
    at the end of each bundle (see the module docstring)."""

    def finish_bundle(self):
        flush()


class StageCounters:
    """The counters of one stage; picklable, so a DoFn can hold one.

    Args:
        stage: stage name (``clean``, ``quality``...); the namespace is ``deepwhale.data.<stage>``.
    """

    def __init__(self, stage: str):
        self.namespace = PREFIX + stage
        self.sink = _SINK
        self.seen = Counter(self.namespace, "in")
        self.kept = Counter(self.namespace, "kept")
        self._extra: dict = {}

    def _get(self, name: str) -> Counter:
        c = self._extra.get(name)
        if c is None:
            global _SINK
            saved, _SINK = _SINK, self.sink  # the folder this stage was built with
            try:
                c = self._extra[name] = Counter(self.namespace, name)
            finally:
                _SINK = saved
        return c

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` documents dropped for ``reason`` (a short snake_case word)."""
        self._get(f"dropped.{reason}").inc(n)

    def count(self, name: str, n: int = 1) -> None:
        """Count ``n`` under an extra counter ``name`` (e.g. ``copies`` made by augment)."""
        self._get(name).inc(n)

    def __getstate__(self):
        return {
            "namespace": self.namespace,
            "sink": self.sink,
            "seen": self.seen,
            "kept": self.kept,
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._extra = {}


def _add(out: dict, ns: str, name: str, value: int) -> None:
    if not ns.startswith(PREFIX):
        return
    entry = out.setdefault(ns[len(PREFIX) :], {})
    if name.startswith("dropped."):
        d = entry.setdefault("dropped", {})
        d[name[len("dropped.") :]] = d.get(name[len("dropped.") :], 0) + int(value)
    else:
        entry[name] = entry.get(name, 0) + int(value)


def read_sink(folder: str | os.PathLike) -> dict:
    """Sum the counter files under ``folder`` into :func:`collect`'s shape.

    Raises:
        ValueError: a counter file that is not the JSON this module writes.
    """
    out: dict = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text("utf-8"))
            items = [(ns, k, int(v)) for ns, c in data["totals"].items() for k, v in c.items()]
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path}: not a deepwhale counter file ({e})") from None
        for ns, name, value in items:
            _add(out, ns, name, value)
    return out


def collect(result, sink: str | os.PathLike | None = None) -> dict:
    """Counters of a finished pipeline run, as ``{stage: {"in", "kept", "dropped": {...}}}``.

    Stages that only count other things (``read``: ``files``, ``docs``...) keep their names.
    Committed values are used where the runner reports them, else attempted ones. A runner
    whose result has no metrics (``NotImplementedError``) is read from the counter files in
    ``sink`` instead (the launching process's own totals are flushed first).

    Raises:
        RuntimeError: the runner has no metrics and no ``sink`` was given.
    """
    try:
        query = result.metrics().query()
    except NotImplementedError:
        if sink is None:
            raise RuntimeError(
                f"{type(result).__name__} reports no metrics and no counter folder was set"
            ) from None
        flush()
        return read_sink(sink)
    out: dict = {}
    for r in query["counters"]:
        value = r.committed if r.committed is not None else r.attempted
        _add(out, r.key.metric.namespace, r.key.metric.name, value)
    return out
