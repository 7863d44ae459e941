"""The planner against a real run: two short ``torchrun`` jobs (dp=2, then tp=2 with sequence
parallelism) with the collective counter on; the planner's comm bytes per step per mesh dimension
and its parameter, gradient and optimizer bytes must be within 15% of what the ranks counted."""

from __future__ import annotations

import pytest

from deepwhale.parallel import comm_counter as cc
from tests.parallel.launch import torchrun, write_config

TOL = 0.15
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send")


def _cfg(out, data) -> dict:
    return {
        "out_dir": str(out),
        "model": {"name": "debug-llama"},
        "data": {"path": str(data), "seq_len": 33, "limit": 200},
        "optim": {"lr": 1.0e-3, "grad_clip": 1.0},
        "train": {"steps": 3, "micro_batch_size": 2, "grad_accum": 1, "device": "cpu"},
        "checkpoint": {"interval": 0, "save_final": False},
        "log": {"interval": 1, "quiet": True, "tensorboard": False, "csv": False},
    }


@pytest.mark.slow
@pytest.mark.parametrize("parallel,dim", [("dp=2", "dp"), ("tp=2", "tp")])
def test_planner_matches_counted_bytes(tmp_path, shakespeare, monkeypatch, parallel, dim):
    monkeypatch.setenv(cc.ENV, "1")
    cfg = write_config(tmp_path / "cfg.yaml", _cfg(tmp_path / "run", shakespeare))
    proc = torchrun(2, ["-c", str(cfg), "--parallel", parallel], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = cc.read_records(tmp_path / "run")
    assert len(records) == 2
    est = cc.planner_estimate(records[0])
    predicted = est.comm_bytes(dim)
    for r in records:
        assert len(r["steps"]) == 3
        counted = sum(cc.step_bytes(r, dim, op) for op in OPS)
        assert predicted == pytest.approx(counted, rel=TOL), (dim, r["steps"][-1])
        mem = est.memory_by_stage[r["pp_rank"]]
        for part in ("params", "grads", "optimizer"):
            assert getattr(mem, part) == pytest.approx(r["memory"][part], rel=TOL), part
