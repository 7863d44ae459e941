"""Run logs: a CSV file, TensorBoard events and a console progress bar with an ETA."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

FIELDS = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "aux_loss",
    "expert_imbalance",
    "val_loss",
    "val_ppl",
]


def perplexity(loss: float) -> float:
    """``exp(loss)`` for a mean token loss in nats (inf on overflow)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class MetricsLogger:
    """Writes one row per logged step to ``metrics.csv`` and scalars to TensorBoard.

    Args:
        out_dir: run folder.
        csv_log: write ``out_dir/metrics.csv`` (columns :data:`FIELDS`).
        tensorboard: write events to ``out_dir/tb`` with ``torch.utils.tensorboard``.
        resume_step: on resume, rows after this step (logged after the checkpoint the run
            resumes from) are dropped so the file reads as one uninterrupted run.
    """

    def __init__(
        self, out_dir: Path, csv_log: bool = True, tensorboard: bool = True, resume_step: int = 0
    ) -> None:
        self.csv_path = out_dir / "metrics.csv" if csv_log else None
        self._writer = None
        if self.csv_path is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            if resume_step and self.csv_path.exists():
                with self.csv_path.open(newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            with self.csv_path.open("w", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                w.writeheader()
                w.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - tensorboard is in the train extra
                raise ImportError(
                    f"log.tensorboard needs the tensorboard package ({e}); "
                    "pip install tensorboard, or set log.tensorboard=false"
                ) from None

            self._writer = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` (keys from :data:`FIELDS`; missing ones left empty)."""
        if self.csv_path is not None:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, FIELDS).writerow({k: _fmt(row.get(k)) for k in FIELDS})
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._writer.add_scalar(
                        f"train/{k}" if "val" not in k else f"val/{k}", v, row["step"]
                    )

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.9g}"  # round-trips fp32 values exactly
    return v


class Progress:
    """A rich progress bar with elapsed time, ETA and the latest loss; silent when ``quiet``."""

    def __init__(self, total: int, start: int = 0, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bar = None
        if not quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        """Move to ``step`` with a status text."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def print(self, text: str) -> None:
        """A console line above the bar (nothing when quiet)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False)

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
