"""The HumanEval sandbox (real subprocesses) and the unbiased pass@k estimator."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

import pytest

from deepwhale.eval import sandbox

HUMANEVAL = (
    Path(__file__).resolve().parents[2] / "../shared/data/bench/humaneval/HumanEval.jsonl.gz"
)


def _first_problem() -> dict:
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} not present")
    with gzip.open(HUMANEVAL, "rt") as f:
        return json.loads(f.readline())


def test_canonical_solution_passes_and_wrong_one_fails():
    p = _first_problem()  # HumanEval/0 has_close_elements
    good = sandbox.humaneval_program(
        p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]
    )
    res = sandbox.run_program(good)
    assert res.passed and res.returncode == 0, res.stderr
    bad = sandbox.humaneval_program(p["prompt"], "    return False\n", p["test"], p["entry_point"])
    res = sandbox.run_program(bad)
    assert res.status == "failed" and "AssertionError" in res.stderr


def test_infinite_loop_times_out_and_its_process_group_is_killed(tmp_path):
    marker = tmp_path / "child_pid"
    program = (
        "import os, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "while True: pass\n"
    )
    t0 = time.monotonic()
    res = sandbox.run_program(program, timeout_s=1.5)
    assert res.status == "timeout" and res.returncode is None
    assert time.monotonic() - t0 < 5
    pid = int(marker.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    # the grandchild is gone (or a zombie awaiting its reaper), not still spinning
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


def test_memory_hog_fails_with_memory_error():
    res = sandbox.run_program("x = bytearray(2 * 1024**3)\n", memory_bytes=512 * 1024**2)
    assert res.status == "failed" and "MemoryError" in res.stderr


def test_socket_creation_is_refused():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9))\n"
    res = sandbox.run_program(program)
    assert res.status == "failed" and "PermissionError" in res.stderr
    res = sandbox.run_program("import socket\nsocket.socket()\n")
    assert res.status == "failed" and "network access is disabled" in res.stderr


def test_files_written_in_cwd_stay_in_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = "import os\nopen('leak.txt', 'w').write('x')\nprint(os.getcwd())\nassert os.path.exists('leak.txt')\n"
    res = sandbox.run_program(program)
    assert res.passed, res.stderr
    assert not (tmp_path / "leak.txt").exists()
    assert not list(Path(sandbox.tempfile.gettempdir()).glob("deepwhale-sandbox-*/leak.txt"))


def test_bad_limits_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        sandbox.run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        sandbox.run_program("pass", memory_bytes=-1)


def test_pass_at_k_matches_hand_computation():
    # 1 - C(n-c, k) / C(n, k), written out by hand
    assert sandbox.pass_at_k(1, 1, 1) == 1.0
    assert sandbox.pass_at_k(1, 0, 1) == 0.0
    assert sandbox.pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # 1 - 3/5
    assert sandbox.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
    assert sandbox.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert sandbox.pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a pass
    for n, c, k in [(20, 7, 3), (200, 13, 10), (50, 0, 5)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert sandbox.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="n=3 c=4"):
        sandbox.pass_at_k(3, 4, 1)
