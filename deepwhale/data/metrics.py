"""Per-stage kept / dropped counters on Beam Metrics, and reading them back after a run.

Every stage counts under the namespace ``deepwhale.data.<stage>``: ``in`` (documents seen),
``kept`` (passed on) and ``dropped.<reason>`` (one counter per reason). The runner aggregates
them across workers; :func:`collect` turns the query result into a plain dict for the report.
"""

from __future__ import annotations

from apache_beam.metrics import Metrics

PREFIX = "deepwhale.data."


class StageCounters:
    """The counters of one stage; picklable, so a DoFn can hold one.

    Args:
        stage: stage name (``clean``, ``quality``...); the namespace is ``deepwhale.data.<stage>``.
    """

    def __init__(self, stage: str):
        self.namespace = PREFIX + stage
        self.seen = Metrics.counter(self.namespace, "in")
        self.kept = Metrics.counter(self.namespace, "kept")
        self._dropped: dict = {}

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` documents dropped for ``reason`` (a short snake_case word)."""
        c = self._dropped.get(reason)
        if c is None:
            c = self._dropped[reason] = Metrics.counter(self.namespace, f"dropped.{reason}")
        c.inc(n)

    def count(self, name: str, n: int = 1) -> None:
        """Count ``n`` under an extra counter ``name`` (e.g. ``copies`` made by augment)."""
        Metrics.counter(self.namespace, name).inc(n)

    def __getstate__(self):
        return {"namespace": self.namespace, "seen": self.seen, "kept": self.kept}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._dropped = {}


def collect(result) -> dict:
    """Counters of a finished pipeline run, as ``{stage: {"in", "kept", "dropped": {...}}}``.

    Stages that only count other things (``read``: ``files``, ``docs``...) keep their names.
    Committed values are used where the runner reports them, else attempted ones.
    """
    out: dict = {}
    for r in result.metrics().query()["counters"]:
        ns = r.key.metric.namespace
        if not ns.startswith(PREFIX):
            continue
        stage = ns[len(PREFIX) :]
        name = r.key.metric.name
        value = r.committed if r.committed is not None else r.attempted
        entry = out.setdefault(stage, {})
        if name.startswith("dropped."):
            d = entry.setdefault("dropped", {})
            d[name[len("dropped.") :]] = d.get(name[len("dropped.") :], 0) + int(value)
        else:
            entry[name] = entry.get(name, 0) + int(value)
    return out
