"""Bar charts of ``results.json`` metrics (matplotlib, Agg backend): ``results.png``.

One bar per (task, metric), with the metric's ``*_stderr`` as an error bar; accuracy-type
metrics (``acc``, ``acc_norm``, ...) on one panel, generative ones (``exact_match_*``,
``pass_at_1``) on another, perplexity-type metrics
(``*_perplexity``, ``bits_per_byte``) on their own, since their scales differ. Several runs
(``--compare``, ``--quantize``) give grouped bars, one colour per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from deepwhale.atomic import atomic_write

ACC_METRICS = ("acc", "acc_norm")
PPL_METRICS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _rows(runs: Sequence[dict], names: Sequence[str] | None) -> list[tuple[str, str]]:
    """(task, metric) pairs present in any run; ``names=None``: the generative metrics."""
    from deepwhale.eval.report import metric_names

    rows: list[tuple[str, str]] = []
    for run in runs:
        for task, res in run["results"].items():
            found = names
            if found is None:
                found = [n for n in metric_names(res) if n.startswith(("exact_match", "pass_at_"))]
            for name in found:
                if name in res and (task, name) not in rows:
                    rows.append((task, name))
    return rows


def _num(value) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def chart(runs: Sequence[dict], labels: Sequence[str] | None = None):
    """A :class:`matplotlib.figure.Figure`: one panel per metric kind present, one bar per
    (task, metric) and run; a run missing a task gets no bar (NaN height).

    Args:
        runs: ``results.json`` dicts (see :mod:`deepwhale.eval.report`).
        labels: one legend name per run (default: none for a single run).

    Raises:
        ValueError: no run has a metric to plot.
    """
    from matplotlib.figure import Figure  # the Agg canvas, no pyplot state or display

    panels = [
        (kind, _rows(runs, names))
        for kind, names in (
            ("accuracy", ACC_METRICS),
            ("generative", None),
            ("perplexity", PPL_METRICS),
        )
    ]
    panels = [(kind, rows) for kind, rows in panels if rows]
    if not panels:
        raise ValueError("no accuracy, generative or perplexity metrics to plot")
    fig = Figure(
        figsize=(max(4.0, 1.2 * max(len(r) for _, r in panels) * len(runs)), 3.5 * len(panels))
    )
    width = 0.8 / len(runs)
    for p, (kind, rows) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        for r, run in enumerate(runs):
            res = run["results"]
            heights = [_num(res.get(t, {}).get(m)) for t, m in rows]
            errs = [_num(res.get(t, {}).get(f"{m}_stderr")) for t, m in rows]
            xs = [i + (r - (len(runs) - 1) / 2) * width for i in range(len(rows))]
            label = labels[r] if labels else None
            ax.bar(
                xs,
                heights,
                width,
                yerr=[0.0 if math.isnan(e) else e for e in errs],
                capsize=3,
                label=label,
            )
        ax.set_xticks(range(len(rows)), [f"{t}\n{m}" for t, m in rows], fontsize=8)
        ax.set_ylabel(kind)
        if labels:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_chart(runs: Sequence[dict], path: str | Path, labels: Sequence[str] | None = None):
    """Write :func:`chart` as a PNG at ``path`` atomically; returns the figure.

    Raises:
        ValueError: nothing to plot. OSError: the folder cannot be written.
    """
    fig = chart(runs, labels)
    path = Path(path)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    return fig
