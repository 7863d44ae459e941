"""Learning-rate schedules as pure functions of the optimizer step.

A schedule holds no state beyond its settings, so resuming at step ``N`` gives exactly the learning
rate an uninterrupted run has at ``N``. Steps count from 0 (the first optimizer step uses
``lr_at(0)``).

* ``constant``: linear warm-up to ``lr``, then ``lr``.
* ``cosine``: linear warm-up to ``lr``, then half-cosine decay to ``min_lr_ratio * lr`` at the last
  step (Loshchilov & Hutter 2017, SGDR, without restarts).
* ``staged``: linear warm-up to the first stage, then piecewise-constant ``stage_lrs`` switching at
  ``stage_steps``: DeepSeek's fine-tuning advice ``1e-5 -> 5e-6 -> 1e-6``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


@dataclass
class LRSchedule:
    """Learning rate at each optimizer step.

    Args:
        name: ``cosine``, ``constant`` or ``staged``.
        lr: peak learning rate (cosine / constant).
        total_steps: optimizer steps of the whole run (the cosine reaches its floor at the last).
        warmup_steps: linear warm-up steps; step ``s < warmup_steps`` gets
            ``target * (s + 1) / warmup_steps``.
        min_lr_ratio: cosine floor as a share of ``lr``.
        stage_lrs: staged learning rates (absolute).
        stage_steps: steps at which stages 2, 3... begin.

    Raises:
        ValueError: an unknown name or inconsistent stages.
    """

    name: str
    lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    stage_lrs: list[float] = field(default_factory=list)
    stage_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in ("cosine", "constant", "staged"):
            raise ValueError(f"unknown schedule {self.name!r}; use cosine, constant or staged")
        if self.name == "staged" and len(self.stage_steps) != len(self.stage_lrs) - 1:
            raise ValueError("staged schedule needs len(stage_lrs) - 1 stage_steps")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self.name == "staged":
            target = self.stage_lrs[bisect.bisect_right(self.stage_steps, step)]
        else:
            target = self.lr
        if step < self.warmup_steps:
            first = self.stage_lrs[0] if self.name == "staged" else self.lr
            return first * (step + 1) / self.warmup_steps
        if self.name == "cosine":
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            floor = self.min_lr_ratio * self.lr
            return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))
        return target

    def state_dict(self) -> dict:
        """The settings (for checkpoints; the schedule itself is stateless)."""
        return {
            "name": self.name,
            "lr": self.lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "stage_lrs": list(self.stage_lrs),
            "stage_steps": list(self.stage_steps),
        }


def schedule_from_config(cfg) -> LRSchedule:
    """Build the :class:`LRSchedule` of a :class:`~deepwhale.train.config.TrainConfig`."""
    s = cfg.schedule
    return LRSchedule(
        name=s.name,
        lr=cfg.optim.lr,
        total_steps=cfg.train.steps,
        warmup_steps=s.warmup_steps,
        min_lr_ratio=s.min_lr_ratio,
        stage_lrs=list(s.stage_lrs),
        stage_steps=list(s.stage_steps),
    )
