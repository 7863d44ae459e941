"""``python -m deepwhale.eval.lm_eval_cli --model deepwhale ...``: lm-eval's own CLI in a real
process, with our model registered, agrees with ``deepwhale eval`` on the same documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.eval import evaluate  # noqa: E402
from tests.eval.lm_eval_tasks import write_tasks  # noqa: E402
from tests.helpers import REPO, shared_data  # noqa: E402


@pytest.mark.slow
def test_lm_eval_cli_runs_deepwhale(tmp_path):
    bench = shared_data("bench")
    tasks = tmp_path / "tasks"
    write_tasks(tasks, bench / "arc_easy" / "test.json", [], [{"text": "Once upon a time."}])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deepwhale.eval.lm_eval_cli", "--model", "deepwhale"]
    cmd += ["--model_args", f"pretrained={DEFAULT_MODEL},dtype=float32", "--device", "cpu"]
    cmd += ["--tasks", "dw_arc_easy", "--include_path", str(tasks), "--limit", "3"]
    cmd += ["--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = list((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(found.read_text())["results"]["dw_arc_easy"]
    model = DeepSeekModel.from_pretrained(DEFAULT_MODEL, device="cpu", dtype="float32")
    ours = evaluate(model, ["arc_easy"], bench, limit=3)["results"]["arc_easy"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
