"""The quality monitor: ``report.json`` (per-stage kept / dropped counts, perplexity summary)
and ``perplexity_hist.png`` (a histogram of log10 perplexity, matplotlib Agg backend).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from deepwhale.atomic import atomic_write, write_json


def ppl_summary(values: list[float]) -> dict:
    """Count, mean, min, max and 5/25/50/75/95th percentiles of the finite perplexities."""
    import numpy as np

    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    out = {"count": int(len(values)), "finite": int(finite.size)}
    if finite.size:
        out.update(mean=float(finite.mean()), min=float(finite.min()), max=float(finite.max()))
        for q in (5, 25, 50, 75, 95):
            out[f"p{q}"] = float(np.percentile(finite, q))
    return out


def plot_histogram(values: list[float], path: Path, cutoff: float | None = None) -> Path:
    """Write a PNG histogram of log10(perplexity) to ``path`` (atomically); returns ``path``.

    A vertical line marks ``cutoff`` (the kept / dropped boundary) when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    finite = np.log10([v for v in values if math.isfinite(v) and v > 0] or [1.0])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(finite, bins=min(50, max(5, len(finite) // 5)), color="#3b75af")
    if cutoff is not None and cutoff > 0:
        ax.axvline(math.log10(cutoff), color="#c0392b", linestyle="--", label="cutoff")
        ax.legend()
    ax.set_xlabel("log10 perplexity")
    ax.set_ylabel("documents")
    ax.set_title(f"Perplexity of {len(values)} documents")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def perplexity_summary(values: list[float], out_dir: Path, cutoff: float | None = None) -> dict:
    """:func:`ppl_summary` of ``values``, after writing their histogram (``cutoff`` marked) to
    ``out_dir/perplexity_hist.png``; its ``histogram`` field names that file."""
    summary = ppl_summary(values)
    plot_histogram(values, out_dir / "perplexity_hist.png", cutoff)
    summary["histogram"] = "perplexity_hist.png"
    return summary


def write_report(out_dir: Path, counters: dict, extra: dict, ppl_file: Path | None = None) -> dict:
    """Write ``report.json``: ``{"stages": counters, **extra}``.

    Args:
        out_dir: output folder.
        counters: :func:`deepwhale.data.metrics.collect` of the run.
        extra: more top-level fields (config summary, timings, the stages' report fields).
        ppl_file: a JSON list of perplexities to summarise as ``perplexity`` (with the
            histogram, at ``extra["perplexity_cutoff"]``), or None. The pipeline passes None:
            its ``perplexity`` stage reports its own summary.

    Returns:
        The report dict.
    """
    report = {"stages": counters, **extra}
    if ppl_file is not None and ppl_file.exists():
        values = json.loads(ppl_file.read_text())
        report["perplexity"] = perplexity_summary(values, out_dir, extra.get("perplexity_cutoff"))
    write_json(out_dir / "report.json", report)
    return report
