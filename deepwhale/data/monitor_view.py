"""``deepwhale data monitor OUT_DIR``: the live monitor's ``monitor/live.json`` drawn in the
terminal with rich.

It shows a table of the latest windows (time, documents in and out, drop rate, perplexity
median, alerts) and two bar charts: the drop reasons of the whole run so far, and the perplexity
histogram of the last window. It redraws every ``interval`` seconds while the pipeline writes
(:mod:`deepwhale.data.monitor`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

BAR = 40  # characters of the longest bar


class MonitorError(ValueError):
    """No readable ``monitor/live.json`` under the folder (the message says why)."""


def read_live(out_dir: str | Path) -> dict:
    """``<out_dir>/monitor/live.json`` as a dict.

    Raises:
        MonitorError: the folder or the file is missing, or the file is not the monitor's JSON.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise MonitorError(f"{out}: no such folder")
    path = out / "monitor" / "live.json"
    if not path.exists():
        raise MonitorError(
            f"{path}: not written yet (is a streaming run using {out} as its output?)"
        )
    try:
        live = json.loads(path.read_text("utf-8"))
    except ValueError as e:
        raise MonitorError(f"{path}: not a live-monitor file ({e})") from None
    if not (
        isinstance(live, dict)
        and isinstance(live.get("windows"), list)
        and isinstance(live.get("totals"), dict)
    ):
        raise MonitorError(f"{path}: not a live-monitor file (no windows and totals)")
    return live


def bars(title: str, counts: dict[str, float]) -> Table:
    """A horizontal bar chart of ``counts`` (largest bar :data:`BAR` characters)."""
    table = Table(title=title, show_header=False, box=None, title_justify="left")
    table.add_column(justify="right")
    table.add_column()
    table.add_column(justify="right")
    top = max(counts.values(), default=0) or 1
    for name, n in counts.items():
        table.add_row(name, Text("█" * max(1, round(BAR * n / top)), style="cyan"), f"{n:g}")
    if not counts:
        table.add_row("(none yet)", "", "")
    return table


def render(live: dict, last: int = 10) -> Group:
    """The monitor screen for ``live``: the last ``last`` windows, the drop reasons so far,
    and the last window's perplexity histogram."""
    windows = live["windows"][-last:]
    table = Table(title="deepwhale data monitor", title_justify="left")
    for col in ("window end", "in", "out", "drop rate", "ppl median", "alerts"):
        table.add_column(col)
    for w in windows:
        end = time.strftime("%H:%M:%S", time.localtime(w["window"][1]))
        rate = "-" if w["drop_rate"] is None else f"{w['drop_rate']:.1%}"
        med = w["perplexity"]["median"]
        alerts = "; ".join(w["alerts"])
        table.add_row(
            end,
            str(w["docs_in"]),
            str(w["docs_out"]),
            rate,
            "-" if med is None else f"{med:.1f}",
            Text(alerts or "ok", style="bold red" if alerts else "green"),
        )
    totals = live["totals"]
    hist = windows[-1]["perplexity"]["histogram"] if windows else {}
    order = sorted(hist, key=lambda k: float(k.removeprefix("ppl_le_")))
    return Group(
        table,
        Text(
            f"total: {totals['docs_in']} in, {totals['docs_out']} out; "
            f"languages {totals.get('languages') or '-'}"
        ),
        bars("drop reasons (whole run)", totals["dropped"]),
        bars("perplexity, last window", {k.replace("ppl_le_", "<= "): hist[k] for k in order}),
    )


def watch(out_dir: str | Path, interval: float, console) -> None:
    """Redraw :func:`render` of ``out_dir`` every ``interval`` seconds until Ctrl-C.

    Raises:
        MonitorError: as :func:`read_live`, on the first read.
    """
    from rich.live import Live

    live = read_live(out_dir)
    with Live(render(live), console=console, refresh_per_second=4) as screen:
        try:
            while True:
                time.sleep(interval)
                try:
                    live = read_live(out_dir)
                except MonitorError:
                    continue  # being replaced: keep the last screen
                screen.update(render(live))
        except KeyboardInterrupt:
            pass
