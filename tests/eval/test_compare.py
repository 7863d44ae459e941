"""``deepwhale eval --compare``: one table over several real runs (ratios to the first, blank
cells for a task a run lacks), a grouped chart, and a garbled results.json named in the error."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deepwhale.cli import app
from tests.helpers import shared_data


def test_compare_two_runs(tmp_path):
    bench = shared_data("bench")
    base = ["eval", "--limit", "1", "--data-dir", str(bench), "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        CliRunner().invoke(app, [*base, "-t", "arc_easy,hellaswag", "--out", str(a)]).exit_code == 0
    )
    assert CliRunner().invoke(app, [*base, "-t", "arc_easy", "--out", str(b)]).exit_code == 0
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        app, ["eval", "--compare", str(a), "--compare", str(b), "--out", str(out)]
    )
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "| Task | Metric | a | b | b/a |"
    acc = json.loads((a / "results.json").read_text())["results"]["arc_easy"]["acc"]
    arc = next(line for line in lines if line.startswith("| arc_easy | acc |"))
    ratio = "1.0000" if acc else ""  # the same model and documents: equal scores
    assert arc == f"| arc_easy | acc | {acc:.4f} | {acc:.4f} | {ratio} |"
    hs = next(line for line in lines if line.startswith("| hellaswag | acc |"))
    assert hs.endswith("|  |  |")  # b has no hellaswag: blank cell, blank ratio
    assert (out / "compare.md").read_text() == res.stdout
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    (b / "results.json").write_text("{not json")
    bad = CliRunner().invoke(app, ["eval", "--compare", str(a), "--compare", str(b)])
    assert bad.exit_code == 2 and bad.stderr.startswith(
        f"error: {b / 'results.json'}: not valid JSON"
    )
    missing = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no results.json there" in missing.stderr
