"""Fault-recovery parts on one process: heartbeats, the recovery report, the fault-injection hook,
and resume on a torchrun restart (the multi-process runs are in tests/parallel/test_recovery.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from deepwhale.train import checkpoint as ckpt
from deepwhale.train import recovery
from tests.helpers import REPO
from tests.train.conftest import base_overrides
from tests.train.test_trainer import make

KW = {"train.steps": 4, "train.micro_batch_size": 2, "checkpoint.interval": 2, "data.limit": 100}


def test_process_start_time_agrees_with_psutil():
    start = recovery.process_start_time()
    # psutil places the start on a boot time rounded down to whole seconds
    assert abs(start - psutil.Process().create_time()) < 1.5
    assert start <= time.time()


def test_fault_injection_parses_and_kills_only_its_rank_step_and_first_attempt(monkeypatch):
    monkeypatch.setenv(recovery.FAULT_ENV, "rank=1,step=7")
    assert recovery.FaultInjection.from_env() == recovery.FaultInjection(rank=1, step=7)
    monkeypatch.setenv(recovery.FAULT_ENV, "step7")
    with pytest.raises(ValueError, match=r"expected 'rank=R,step=K\[,mode=kill\|raise\]'"):
        recovery.FaultInjection.from_env()
    monkeypatch.delenv(recovery.FAULT_ENV)
    assert recovery.FaultInjection.from_env() is None
    hook = recovery.FaultInjection(rank=0, step=3)
    hook.maybe_kill(rank=1, next_step=3)  # another rank: nothing
    hook.maybe_kill(rank=0, next_step=2)  # another step: nothing
    monkeypatch.setenv(recovery.RESTART_ENV, "1")
    hook.maybe_kill(rank=0, next_step=3)  # a restarted attempt: nothing
    # the first attempt really dies of SIGKILL
    code = "from deepwhale.train.recovery import FaultInjection as F; F(0, 3).maybe_kill(0, 3)"
    env = {**os.environ, "PYTHONPATH": str(REPO), recovery.RESTART_ENV: "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(REPO), timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_report_parts_add_up_and_describe_names_them():
    hb = {"step": 10, "time": 100.0, "pid": 1}
    clock = recovery.RecoveryClock(hb, 102.5, 104.0, 104.25, load_start=105.0, load_end=105.5)
    rec = clock.report(8, None, 106.0)
    assert rec["total_s"] == 6.0 and rec["detection_restart_s"] == 2.5
    assert (rec["startup_s"], rec["rendezvous_s"], rec["build_s"]) == (1.5, 0.25, 0.75)
    assert (rec["checkpoint_load_s"], rec["first_step_s"]) == (0.5, 0.5)
    assert recovery.describe(rec) == (
        "recovered from step 8 in 6.00 s (detection+restart 2.50 s, startup 1.50 s, "
        "rendezvous 0.25 s, build 0.75 s, checkpoint load 0.50 s, first step 0.50 s)"
    )
    fresh = recovery.RecoveryClock(None, 102.5, 104.0, 104.0).report(0, None, 106.0)
    assert fresh["detection_restart_s"] is None and fresh["total_s"] == 3.5
    assert "since process start" in recovery.describe(fresh)


def test_restart_resumes_as_auto_and_writes_the_recovery_report(
    tmp_path, shakespeare, monkeypatch, caplog
):
    make(tmp_path, shakespeare, **KW).fit(max_steps=3)  # "dies" after step 3; checkpoint 2
    beat = json.loads((tmp_path / recovery.HEARTBEAT).read_text())
    assert beat["step"] == 3 and beat["pid"] == os.getpid()
    monkeypatch.setenv(recovery.RESTART_ENV, "1")
    with caplog.at_level("WARNING"):
        again = make(tmp_path, shakespeare, **KW)  # config says resume: none
        assert again.step == 2
        hist = again.fit()
    assert [h["step"] for h in hist] == [3, 4]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("checkpoint.resume=none taken as auto" in m for m in msgs)
    rec = json.loads((tmp_path / recovery.RECOVERY).read_text())
    assert rec["step"] == 2 and rec["restart_count"] == 1 and rec["rendezvous_s"] == 0
    assert rec["last_heartbeat"]["step"] == 3 and rec["total_s"] > 0
    assert any(m.startswith("recovered from step 2 in ") for m in msgs)


def test_checkpoint_problem_names_the_file(tmp_path, shakespeare, monkeypatch):
    from deepwhale.cli import app

    make(tmp_path, shakespeare, **KW).fit()
    root = tmp_path / "checkpoints"
    newest = ckpt.step_dir(root, 4)
    assert ckpt.checkpoint_problem(newest) is None
    (newest / "rng.pt").unlink()
    assert ckpt.checkpoint_problem(newest) == f"{newest / 'rng.pt'} is missing"
    (newest / "optimizer.pt").write_bytes(b"x" * 7)  # listed before rng.pt
    assert ckpt.checkpoint_problem(newest).startswith(f"{newest / 'optimizer.pt'} is 7 bytes")
    (newest / ckpt.STATE).unlink()
    assert "state.json is missing" in ckpt.checkpoint_problem(newest)
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    ckpt.prune(root, keep_last=1)  # keeps the newest complete one (and leaves the broken one)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    # none left: `deepwhale train` stops with one line and exit code 2
    (ckpt.step_dir(root, 2) / "model.pt").write_bytes(b"")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    res = CliRunner().invoke(
        app, ["train", *base_overrides(tmp_path, shakespeare, **KW), "--resume", "auto"]
    )
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: resume auto: no usable checkpoint")
    assert "step-00000002: " in lines[0] and "model.pt is 0 bytes" in lines[0]
