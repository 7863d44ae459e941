"""The collective counter (deepwhale.parallel.comm_counter) in this process, on a one-rank gloo
group: what it counts, under which label, and that it leaves torch as it found it."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as fc

from deepwhale.parallel import comm_counter as cc


@pytest.fixture
def world():
    """A one-process gloo default group, destroyed afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo",
        rank=0,
        world_size=1,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=30),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_counts_payload_bytes_per_label_and_op(world):
    originals = {name: getattr(dist, name) for name in cc.DIST_OPS}
    sub = dist.new_group([0])
    with cc.CommCounter() as counter:
        counter.label(sub, "tp")  # a one-rank group sends nothing: not labelled
        assert counter.labels == {}
        counter.label(sub.group_name, "tp")  # by name it is
        x = torch.ones(10)  # 40 bytes
        dist.all_reduce(x)  # default group: "world"
        dist.all_reduce(x, group=sub)
        out = torch.empty(10)
        dist.all_gather_into_tensor(out, x, group=sub)  # payload = input
        dist.reduce_scatter_tensor(torch.empty(10), x, group=sub)
        work = dist.all_reduce(torch.ones(4, dtype=torch.float64), group=sub, async_op=True)
        work.wait()
        fc.all_reduce(torch.ones(3), "sum", sub).wait()  # DTensor's path
        got = counter.take()
        assert got["bytes"] == {
            "world": {"all_reduce": 40},
            "tp": {"all_reduce": 40 + 32 + 12, "all_gather": 40, "reduce_scatter": 40},
        }
        assert got["calls"]["tp"] == {"all_reduce": 3, "all_gather": 1, "reduce_scatter": 1}
        assert counter.take()["bytes"] == {}  # take() resets
        assert torch.equal(x, torch.ones(10))  # the collectives still ran (one rank: identity)
    assert {name: getattr(dist, name) for name in cc.DIST_OPS} == originals


def test_nested_calls_count_once_and_trace(world):
    counter = cc.CommCounter().install()
    try:
        counter.trace = []
        inner = dist.all_reduce

        def outer(tensor, group=None):  # a wrapper around a wrapped collective
            return inner(tensor, group=group)

        wrapped = counter._wrap(outer, "all_reduce", "tensor", funcol=False)
        wrapped(torch.ones(2))
        got = counter.take()
        assert got["bytes"] == {"world": {"all_reduce": 8}}
        assert got["trace"] == [("world", "all_reduce", 8)]
    finally:
        counter.uninstall()
    assert not getattr(dist.all_reduce, "__wrapped_by_comm_counter__", False)


def test_state_bytes_and_step_recorder(tmp_path):
    model = torch.nn.Linear(4, 3)  # 12 + 3 parameters
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    got = cc.state_bytes(model.parameters(), opt)
    # AdamW: exp_avg + exp_avg_sq per parameter, plus a 4-byte step per tensor
    assert got == {"params": 60, "grads": 60, "optimizer": 2 * 60 + 2 * 4}
    counter = cc.CommCounter()
    rec = cc.StepRecorder(counter, tmp_path / "comm" / "rank0.json", {"rank": 0})
    rec.begin()
    counter.record("all_reduce", "g", 100)
    rec.end(1, 0.5, None, got)
    counter.record("all_reduce", "g", 300)
    rec.end(2, 0.5, {"payload": 1}, None)
    (r,) = cc.read_records(tmp_path)
    assert [s["bytes"] for s in r["steps"]] == [{"other": {"all_reduce": n}} for n in (100, 300)]
    assert r["memory"]["params"] == 60 and r["memory"]["peak_rss"] > 0
    assert cc.step_bytes(r, "other", skip=1) == 300


def test_enabled(monkeypatch):
    monkeypatch.delenv(cc.ENV, raising=False)
    assert not cc.enabled()
    monkeypatch.setenv(cc.ENV, "0")
    assert not cc.enabled()
    monkeypatch.setenv(cc.ENV, "1")
    assert cc.enabled()
