"""A rank that raises or dies under a real ``torchrun`` (gloo on CPU): the job stops by itself, the
failing rank and its error are named in one line, the process-group timeout is the configured
one and shown in the log, and no worker is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.parallel.launch import torchrun, write_config
from tests.parallel.test_equivalence import base


def _cfg(out, data) -> dict:
    d = base(out, data, "debug-llama", 2)
    d["train"]["steps"] = 6
    d["log"]["quiet"] = False
    d["parallel"] = {"timeout_s": 45}
    return d


def _alive_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_failing_rank_stops_the_job_with_one_line(tmp_path, shakespeare, mode):
    cfg = write_config(tmp_path / "cfg.yaml", _cfg(tmp_path / "run", shakespeare))
    proc = torchrun(
        2,
        ["-c", str(cfg), "--parallel", "dp=2"],
        timeout=240,  # a hang fails the test (subprocess.TimeoutExpired)
        environ={"DEEPWHALE_FAULT_INJECT": f"rank=1,step=3,mode={mode}"},
    )
    assert proc.returncode != 0
    # the timeout is the configured one, and rank 0 says so before training
    assert "process-group timeout 45 s" in proc.stdout, proc.stdout[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    if mode == "raise":  # our code names the rank and the error in one line
        assert len(errors) == 1, proc.stderr[-3000:]
        assert errors[0].startswith("error: rank 1/2: RuntimeError: injected fault")
    else:  # a dead process prints nothing; torchrun's report names the rank and the signal
        assert errors == [], errors
        assert "kills itself before step 3" in proc.stderr
        assert "Signal 9 (SIGKILL)" in proc.stderr or "exitcode  : -9" in proc.stderr
    assert _alive_with(str(cfg)) == []  # no orphaned workers
