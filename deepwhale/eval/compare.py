"""``deepwhale eval --compare DIR1 DIR2 ...``: several ``results.json`` in one Markdown table
(rows task/metric, one column per run, then each run's ratio to the first) and a grouped bar
chart (:mod:`deepwhale.eval.plot`). A task or metric a run lacks is a blank cell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from deepwhale.eval.plot import ACC_METRICS, PPL_METRICS


def load_run(folder: str | Path) -> dict:
    """``folder/results.json`` (or ``folder`` itself when it is a file), parsed.

    Raises:
        ValueError: missing, not JSON, or without a ``results`` object (names the path).
    """
    path = Path(folder)
    path = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no results.json there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: no 'results' object; not a deepwhale results.json")
    return data


def _cell(value) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def compare_table(runs: Sequence[dict], labels: Sequence[str], extra_rows=()) -> str:
    """Markdown: ``| Task | Metric | run1 | run2 | ... | run2/run1 | ... |``.

    ``extra_rows``: ``(name, [value per run])`` rows appended (e.g. weight bytes).
    """
    rows: list[tuple[str, str]] = []
    for run in runs:
        for task, res in run["results"].items():
            for name in (*ACC_METRICS, *PPL_METRICS):
                if name in res and (task, name) not in rows:
                    rows.append((task, name))
    ratio_heads = [f"{lab}/{labels[0]}" for lab in labels[1:]]
    head = ["Task", "Metric", *labels, *ratio_heads]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    body = [(t, m, [run["results"].get(t, {}).get(m) for run in runs]) for t, m in rows]
    body += [("", name, list(values)) for name, values in extra_rows]
    for task, metric, values in body:
        base = values[0]
        ratios = []
        for v in values[1:]:
            ok = all(isinstance(x, int | float) and math.isfinite(x) for x in (v, base))
            ratios.append(f"{v / base:.4f}" if ok and base != 0 else "")
        cells = [task, metric, *(_cell(v) for v in values), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def labels_for(folders: Sequence[str | Path]) -> list[str]:
    """Column names: each folder's name (its path where two names collide)."""
    names = [Path(f).name or str(f) for f in folders]
    return [str(f) if names.count(n) > 1 else n for f, n in zip(folders, names, strict=True)]
