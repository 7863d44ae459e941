"""Counters on Beam Metrics and on counter files agree; the files' reader is exact."""

from __future__ import annotations

import json

import apache_beam as beam
import pytest

from deepwhale.data import metrics
from deepwhale.data.metrics import CountingDoFn, StageCounters, collect, read_sink, set_sink


class _Parity(CountingDoFn):
    def __init__(self):
        self.counters = StageCounters("parity")
        self.odd = metrics.counter(metrics.PREFIX + "parity", "odd_seen")

    def process(self, x):
        self.counters.seen.inc()
        if x % 2:
            self.odd.inc()
            self.counters.drop("odd")
            return
        self.counters.kept.inc()
        self.counters.count("even_sum", x)
        yield x


def test_counter_files_equal_beam_metrics_on_fnapi(tmp_path):
    sink = tmp_path / "sink"
    set_sink(sink)
    try:
        p = beam.Pipeline(runner="FnApiRunner")
        _ = p | beam.Create(list(range(101))) | beam.ParDo(_Parity())
        result = p.run()
        result.wait_until_finish()
    finally:
        set_sink(None)
    want = {
        "parity": {"in": 101, "kept": 51, "odd_seen": 50, "even_sum": 2550, "dropped": {"odd": 50}}
    }
    assert collect(result) == want
    metrics.flush()
    assert read_sink(sink) == want


def test_read_sink_sums_processes_and_rejects_garbage(tmp_path):
    ns = metrics.PREFIX + "s"
    (tmp_path / "a.json").write_text(json.dumps({"totals": {ns: {"files": 2, "dropped.x": 4}}}))
    (tmp_path / "b.json").write_text(json.dumps({"totals": {ns: {"in": 5, "dropped.x": 1}}}))
    assert read_sink(tmp_path) == {"s": {"files": 2, "in": 5, "dropped": {"x": 5}}}
    (tmp_path / "c.json").write_text('{"totals": 3}')
    with pytest.raises(ValueError, match=r"c\.json: not a deepwhale counter file"):
        read_sink(tmp_path)


def test_collect_without_metrics_needs_a_sink(tmp_path):
    class NoMetrics:
        def metrics(self):
            raise NotImplementedError

    with pytest.raises(RuntimeError, match="reports no metrics"):
        collect(NoMetrics())
    (tmp_path / "x.json").write_text(
        json.dumps(
            {
                "totals": {metrics.PREFIX + "r": {"docs": 3}},
            }
        )
    )
    assert collect(NoMetrics(), tmp_path) == {"r": {"docs": 3}}


def test_stage_counters_pickle_keeps_sink(tmp_path):
    import pickle

    set_sink(tmp_path)
    try:
        sc = StageCounters("q")
    finally:
        set_sink(None)
    sc2 = pickle.loads(pickle.dumps(sc))
    assert sc2.sink == str(tmp_path.resolve()) and sc2.seen.sink == sc2.sink
    sc2.drop("bad")
    assert sc2._extra["dropped.bad"].sink == sc2.sink


def test_every_data_dofn_counts_on_every_runner():
    """A DoFn of the pipeline that is a plain beam.DoFn would lose its counters on DaskRunner."""
    import importlib
    import inspect
    import pkgutil

    import deepwhale.data

    plain = []
    for mod in pkgutil.iter_modules(deepwhale.data.__path__):
        m = importlib.import_module(f"deepwhale.data.{mod.name}")
        for name, obj in vars(m).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, beam.DoFn)
                and obj.__module__ == m.__name__
                and not issubclass(obj, CountingDoFn)
            ):
                plain.append(f"{m.__name__}.{name}")
    assert not plain, plain
