"""Single-process training: config, data, schedules, MoE balancing, checkpoints and the loop.

    from deepwhale.train import load_config, Trainer
    trainer = Trainer(load_config("examples/train/debug.yaml", ["train.steps=20"]))
    trainer.fit()

Heavy modules (torch) load when :class:`Trainer` is first used, so ``deepwhale.train.cli`` stays
cheap to import.
"""

from __future__ import annotations

from deepwhale.train.config import TrainConfig, TrainConfigError, load_config

__all__ = ["TrainConfig", "TrainConfigError", "Trainer", "load_config"]


def __getattr__(name: str):
    if name == "Trainer":
        from deepwhale.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)
