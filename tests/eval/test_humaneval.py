"""generate_until with pass@1: the built-in humaneval task, scored by running the programs."""

from __future__ import annotations

import json

import pytest

from deepwhale.api import DeepSeekModel
from deepwhale.eval import evaluate
from deepwhale.eval.gen_runner import reduce_generations
from deepwhale.eval.report import markdown_table
from deepwhale.eval.tasks import build_examples, load_docs, load_task


@pytest.fixture(scope="module")
def humaneval():
    task = load_task("humaneval")
    docs = load_docs(task, "test")[:3]
    return task, docs, build_examples(task, docs)


def test_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    """The dataset's own solutions score 1, a wrong body and a hanging one score 0."""
    task, docs, examples = humaneval
    good = [d["canonical_solution"] for d in docs]
    res, samples = reduce_generations(task, examples, good, log_samples=True)
    assert res["pass_at_1"] == 1.0 and res["samples"] == 3
    assert [s["run_none"] for s in samples] == ["passed"] * 3
    bad = ["    return None\n", "    while True:\n        pass\n", "    import socket\n"]
    res, samples = reduce_generations(task, examples, bad, log_samples=True, sandbox_timeout=2)
    assert res["pass_at_1"] == 0.0
    assert [s["run_none"] for s in samples] == ["failed", "timeout", "failed"]


def test_humaneval_task_file():
    task = load_task("humaneval")
    assert task.gen_metric() == "pass_at_1"
    assert task.generation() == (["\nclass", "\ndef", "\n#", "\nif", "\nprint"], 1024)


def test_bundled_model_runs_humaneval(tmp_path):
    """stories260K's 512-token context needs a smaller max_gen_toks than the task's 1024; the
    CLI override gives it, and the report has a pass_at_1 row."""
    model = DeepSeekModel.from_pretrained(device="cpu")
    from deepwhale.eval.tasks import TaskError

    with pytest.raises(TaskError, match="max_gen_toks 1024 leaves no room"):
        evaluate(model, ["humaneval"], limit=1)
    out = evaluate(model, ["humaneval"], limit=2, max_gen_toks=32, log_samples=True)
    res = out["results"]["humaneval"]
    assert res["pass_at_1"] == 0.0 and res["samples"] == 2  # a story model writes no code
    assert all(
        s["run_none"] in ("failed", "passed", "timeout") for s in out["samples"]["humaneval"]
    )
    assert "| humaneval | pass_at_1 | 0.0000 |" in markdown_table(out)
    from typer.testing import CliRunner

    from deepwhale.cli import app

    args = ["eval", "-t", "humaneval,gsm8k", "--limit", "1", "--max-gen-toks", "16", "--quiet"]
    r = CliRunner().invoke(app, [*args, "--num-fewshot", "0", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == {"humaneval", "gsm8k"}
    assert "exact_match_strict-match" in saved["results"]["gsm8k"]
    assert (tmp_path / "results.png").stat().st_size > 0
