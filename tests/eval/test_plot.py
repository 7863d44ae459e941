"""results.png: a valid PNG written by ``deepwhale eval --out``, one bar per task metric (and
per run when grouped), accuracy and perplexity metrics on separate panels."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from deepwhale.cli import app
from deepwhale.eval.plot import chart
from tests.helpers import shared_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_eval_writes_png_with_one_bar_per_metric(tmp_path):
    bench = shared_data("bench")
    doc = tmp_path / "doc.txt"
    doc.write_text("Once upon a time, there was a little girl named Lily. She liked to play.")
    out = tmp_path / "out"
    args = ["eval", "-t", f"arc_easy,ppl:{doc}", "--limit", "3", "--data-dir", str(bench)]
    res = CliRunner().invoke(app, [*args, "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    results = json.loads((out / "results.json").read_text())
    fig = chart([results])
    acc_ax, ppl_ax = fig.axes
    assert len(acc_ax.patches) == 2  # arc_easy acc, acc_norm
    assert len(ppl_ax.patches) == 4  # token/word/byte perplexity, bits_per_byte
    heights = [b.get_height() for b in acc_ax.patches]
    assert heights == [results["results"]["arc_easy"][m] for m in ("acc", "acc_norm")]
    # two runs, the second without the ppl task: grouped bars, blanks are NaN
    other = {"results": {"arc_easy": results["results"]["arc_easy"]}}
    fig2 = chart([results, other], labels=["a", "b"])
    assert len(fig2.axes[0].patches) == 4 and len(fig2.axes[1].patches) == 8
    assert sum(math.isnan(b.get_height()) for b in fig2.axes[1].patches) == 4
