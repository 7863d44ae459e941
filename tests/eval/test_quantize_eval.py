"""``deepwhale eval --quantize fp32,int8``: one real evaluation per mode (the project's
DeepSeekModel.quantize), a sub-folder each, and compare.md with ratios and weight bytes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from deepwhale.cli import app
from tests.helpers import shared_data


def test_quantize_modes_side_by_side(tmp_path):
    text = (shared_data("corpus", "en", "tinystories") / "tinystories_sample.txt").read_text()
    doc = tmp_path / "doc.txt"
    doc.write_text(text[:800])
    out = tmp_path / "q"
    args = ["eval", "-t", f"arc_easy,ppl:{doc}", "--limit", "1", "--quiet", "--out", str(out)]
    res = CliRunner().invoke(
        app, [*args, "--data-dir", str(shared_data("bench")), "--quantize", "fp32,int8"]
    )
    assert res.exit_code == 0, res.stderr
    runs = {m: json.loads((out / m / "results.json").read_text()) for m in ("fp32", "int8")}
    assert runs["int8"]["config"]["quantize"] == "int8"
    assert runs["int8"]["weight_bytes"] < 0.5 * runs["fp32"]["weight_bytes"]
    ppl = {m: r["results"][f"ppl:{doc}"]["token_perplexity"] for m, r in runs.items()}
    assert ppl["int8"] != ppl["fp32"] and abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01
    line = next(x for x in res.stdout.splitlines() if "token_perplexity" in x)
    assert line.endswith(f"| {ppl['int8'] / ppl['fp32']:.4f} |")
    assert (out / "compare.md").read_text() == res.stdout and (out / "compare.png").exists()
    bad = CliRunner().invoke(app, [*args, "--quantize", "fp32,int4"])
    assert bad.exit_code == 2 and "unknown mode 'int4'" in bad.stderr
