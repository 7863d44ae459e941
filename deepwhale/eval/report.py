"""``results.json`` and the Markdown table.

``results.json`` (written atomically: a temporary file, then a rename)::

    {"config": {...}, "versions": {...},
     "results": {"arc_easy": {"acc": ..., "acc_stderr": ..., "acc_norm": ..., ...}},
     "samples": {"arc_easy": [{"doc_index": 0, "logprobs": [...], ...}]}}   # --log-samples

Non-finite numbers (a stderr of one sample) are written as ``null``.
"""

from __future__ import annotations

import math
from pathlib import Path

from deepwhale.atomic import atomic_write, write_json

_METRICS = (
    "acc",
    "acc_norm",
    "token_perplexity",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def metric_names(res: dict) -> list[str]:
    """The reported metrics of one task's results, in table order: the log-likelihood ones,
    then generative ones (``exact_match*``, ``pass_at_1*``)."""
    gen = [k for k in res if k.startswith(("exact_match", "pass_at_")) and "_stderr" not in k]
    return [name for name in _METRICS if name in res] + gen


def markdown_table(results: dict) -> str:
    """``| Task | Metric | Value | Stderr | N |`` rows for every reported metric; a group's
    line (N = its documents) comes before its subjects, which are shown as `` - subject``."""
    lines = ["| Task | Metric | Value | Stderr | N |", "|---|---|---:|---:|---:|"]
    members = {t for ts in results.get("group_subtasks", {}).values() for t in ts}
    for task, res in results["results"].items():
        label = f" - {task}" if task in members else task  # a group's subject, as lm-eval
        for name in metric_names(res):
            err = res.get(f"{name}_stderr")
            err_text = "" if err is None or not math.isfinite(err) else f"{err:.4f}"
            lines.append(f"| {label} | {name} | {res[name]:.4f} | {err_text} | {res['samples']} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` under ``out_dir`` (made if missing), each
    atomically. Returns both paths. Raises OSError when the folder cannot be written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    write_json(json_path, _finite(results))
    table = markdown_table(results)
    atomic_write(md_path, lambda p: p.write_text(table, encoding="utf-8"))
    return json_path, md_path
