"""``deepwhale eval`` as a real process: the table, results.json (atomic, with samples), the
progress bar and ``--quiet``, and one-line errors with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from deepwhale.cli import app
from tests.helpers import REPO, shared_data


def _run(*args: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepwhale", "eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_eval_writes_report(tmp_path):
    bench = shared_data("bench")
    doc = tmp_path / "doc.txt"
    doc.write_text("Once upon a time, there was a little girl named Lily. She liked to play.")
    out = tmp_path / "out"
    args = ["-t", f"arc_easy,ppl:{doc}", "--limit", "4", "--batch-size", "4"]
    proc = _run(*args, "--data-dir", str(bench), "--out", str(out), "--log-samples")
    assert proc.returncode == 0, proc.stderr
    assert "| arc_easy | acc |" in proc.stdout and "bits_per_byte" in proc.stdout
    assert "eval" in proc.stderr  # the progress bar
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "eval_cache.sqlite",
        "results.json",
        "results.md",
        "results.png",
    ]  # no tmp, no WAL left
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["limit"] == 4 and res["versions"]["torch"]
    arc = res["results"]["arc_easy"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(arc)
    samples = res["samples"]["arc_easy"]
    assert len(samples) == 4 and arc["acc"] == sum(s["acc"] for s in samples) / 4
    assert (out / "results.md").read_text() == proc.stdout
    # in-process, --quiet: no progress bar, the same table
    out2 = tmp_path / "out2"
    quiet = CliRunner().invoke(
        app, ["eval", *args, "--data-dir", str(bench), "--quiet", "--out", str(out2)]
    )
    assert quiet.exit_code == 0 and quiet.stdout == proc.stdout
    assert quiet.stderr == f"wrote {out2 / 'results.json'}\n"  # no progress bar
    again = json.loads((out2 / "results.json").read_text())
    assert again["results"] == res["results"] and "samples" not in again


def test_eval_errors_are_one_line(tmp_path):
    proc = _run("-t", "arc_easy,nope")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: unknown task 'nope'; available: arc_easy, gsm8k, hellaswag, humaneval, "
        "truthfulqa_mc1, truthfulqa_mc2, ceval, cmmlu, ppl:FILE"
    )
    res = CliRunner().invoke(app, ["eval", "-t", "arc_easy", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("error: task arc_easy: data file not found")
