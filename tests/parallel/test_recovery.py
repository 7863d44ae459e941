"""Fault recovery under a real ``torchrun`` (gloo on CPU): a worker SIGKILLed mid-run is restarted
by ``--max-restarts`` and the job ends exactly as an uninterrupted one; a checkpoint of 4
processes continues on 2; a truncated newest checkpoint falls back to the previous one, and with
none left the run stops with one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deepwhale.train.recovery import BREAKDOWN
from tests.parallel.launch import losses, torchrun, write_config
from tests.parallel.test_equivalence import base

STEPS = 12
INTERVAL = 4  # checkpoints at steps 4, 8, 12


def _cfg(out, data, steps=STEPS, mbs=2, **checkpoint):
    d = base(out, data, "debug-llama", mbs)
    d["train"]["steps"] = steps
    d["schedule"] = {"name": "constant", "warmup_steps": 2}
    d["checkpoint"] = {
        "interval": INTERVAL,
        "keep_last": 3,
        "save_final": True,
        "resume": "auto",
        **checkpoint,
    }
    return d


def _run(tmp, name, nproc, layout, data, environ=None, extra=None, timeout=240):
    cfg = write_config(tmp / f"{name}.yaml", data)
    return torchrun(
        nproc, ["-c", str(cfg), "--parallel", layout], timeout, extra=extra, environ=environ
    )


def _errors(proc) -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith("error:")]


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare):
    """An uninterrupted dp=2 run of 12 steps, saving synchronously (checkpoints 4, 8, 12)."""
    tmp = tmp_path_factory.mktemp("recovery-ref")
    proc = _run(tmp, "ref", 2, "dp=2", _cfg(tmp / "run", shakespeare, async_save=False))
    assert proc.returncode == 0, "\n".join(_errors(proc)) or proc.stderr[-3000:]
    return tmp / "run"


def test_killed_worker_is_restarted_and_the_run_is_bit_exact(tmp_path, shakespeare, reference):
    # rank 1 SIGKILLs itself before step 11 on the first attempt; torchrun restarts both workers,
    # which resume (resume=none in the config is overridden on a restart) from the newest
    # checkpoint, written asynchronously
    run = tmp_path / "run"
    data = _cfg(run, shakespeare, resume="none", async_save=True)
    proc = _run(
        tmp_path,
        "killed",
        2,
        "dp=2",
        data,
        environ={"DEEPWHALE_FAULT_INJECT": "rank=1,step=11"},
        extra=["--max-restarts=2"],
    )
    assert proc.returncode == 0, "\n".join(_errors(proc)) or proc.stderr[-3000:]
    assert "rank 1 kills itself before step 11" in proc.stderr
    assert "taken as auto" in proc.stderr
    # the resumed steps (and, through metrics.csv keeping the rows before the checkpoint, all
    # of them) and the final weights equal the uninterrupted run's bit for bit
    assert losses(run) == losses(reference)
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    rec = json.loads((run / "recovery.json").read_text())
    assert rec["restart_count"] == 1 and rec["step"] in (4, 8)  # 8 unless its save was late
    assert rec["checkpoint"].endswith(f"step-{rec['step']:08d}")
    # the dead run's last completed step (9 if torchrun's SIGTERM beat rank 0's write of step 10)
    assert rec["last_heartbeat"]["step"] in (9, 10)
    assert all(rec[k] >= 0 for k, _ in BREAKDOWN)
    assert sum(rec[k] for k, _ in BREAKDOWN) == pytest.approx(rec["total_s"], abs=1e-6)
    # how long it took is measured by benchmarks/recovery.py, not asserted here
    line = re.search(r"recovered from step (\d+) in ([\d.]+) s \(detection\+restart", proc.stderr)
    assert line and int(line.group(1)) == rec["step"]
    assert json.loads((run / "heartbeat.json").read_text())["step"] == STEPS
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_four_process_checkpoint_continues_on_two(tmp_path, shakespeare):
    # 4 processes, dp=4, 2 sequences per rank per micro-batch: 8 steps uninterrupted
    full = tmp_path / "full"
    proc = _run(tmp_path, "four", 4, "dp=4", _cfg(full, shakespeare, steps=8, mbs=2))
    assert proc.returncode == 0, "\n".join(_errors(proc)) or proc.stderr[-3000:]
    # a run stopped after step 4 leaves exactly this: its step-4 checkpoint and metrics rows
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004")
    shutil.copy(full / "metrics.csv", part / "metrics.csv")
    # restarted on 2 processes: DCP reshards the 4-rank checkpoint; micro_batch_size doubles so
    # each micro-batch still takes the same 8 sequences of the sampler, in the same order
    proc = _run(tmp_path, "two", 2, "dp=2", _cfg(part, shakespeare, steps=8, mbs=4))
    assert proc.returncode == 0, "\n".join(_errors(proc)) or proc.stderr[-3000:]
    assert "sequences per optimizer step" not in proc.stderr  # no global-batch warning
    got, want = losses(part), losses(full)
    assert len(got) == len(want) == 8
    assert got[:4] == want[:4]
    assert got[4:] == pytest.approx(want[4:], rel=1e-5)
    a, b = _weights(part), _weights(full)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((part / "recovery.json").read_text())["step"] == 4


def test_truncated_newest_checkpoint_falls_back_then_stops(tmp_path, shakespeare, reference):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (4, 8):
        name = f"step-{step:08d}"
        shutil.copytree(reference / "checkpoints" / name, run / "checkpoints" / name)
    shutil.copy(reference / "metrics.csv", run / "metrics.csv")
    shard = run / "checkpoints" / "step-00000008" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # a shard cut short (disk full, lost write)

    proc = _run(tmp_path, "fallback", 2, "dp=2", _cfg(run, shakespeare))
    assert proc.returncode == 0, "\n".join(_errors(proc)) or proc.stderr[-3000:]
    warned = [x for x in proc.stderr.splitlines() if "resume auto: skipping" in x]
    assert len(warned) == 1 and str(shard) in warned[0] and "1000 bytes" in warned[0]
    assert json.loads((run / "recovery.json").read_text())["step"] == 4
    assert losses(run) == losses(reference)  # steps 5-12 redone bit for bit
    a, b = _weights(run), _weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in b)

    # every checkpoint truncated: one line from rank 0, the workers exit 2, no traceback
    for folder in (run / "checkpoints").glob("step-*"):
        for f in folder.glob("*.distcp"):
            f.write_bytes(f.read_bytes()[:1000])
    proc = _run(tmp_path, "none-left", 2, "dp=2", _cfg(run, shakespeare), timeout=120)
    assert proc.returncode != 0
    lines = _errors(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: rank 0/2: resume auto: no usable checkpoint")
    assert "step-00000012: " in lines[0] and "__0_0.distcp is 1000 bytes" in lines[0]
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2 ", proc.stderr)  # torchrun's summary
    # the one traceback is torchrun's own ChildFailedError report, none from a worker
    assert proc.stderr.count("Traceback") == 1
    assert "ChildFailedError" in proc.stderr.split("Traceback")[1]
