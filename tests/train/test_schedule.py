"""Learning-rate schedules, including DeepSeek's staged fine-tuning schedule."""

from __future__ import annotations

import math

import pytest

from deepwhale.train.schedule import LRSchedule


def test_staged_values():
    s = LRSchedule(
        "staged", lr=1.0, total_steps=300, stage_lrs=[1e-5, 5e-6, 1e-6], stage_steps=[100, 200]
    )
    assert [s.lr_at(i) for i in (0, 99, 100, 199, 200, 299, 10_000)] == [
        1e-5,
        1e-5,
        5e-6,
        5e-6,
        1e-6,
        1e-6,
        1e-6,
    ]
    w = LRSchedule(
        "staged", lr=1.0, total_steps=300, warmup_steps=4, stage_lrs=[1e-5, 1e-6], stage_steps=[10]
    )
    assert [w.lr_at(i) for i in range(5)] == pytest.approx([2.5e-6, 5e-6, 7.5e-6, 1e-5, 1e-5])
    assert w.lr_at(10) == 1e-6


def test_cosine_and_constant():
    c = LRSchedule("cosine", lr=1e-3, total_steps=101, warmup_steps=0, min_lr_ratio=0.1)
    assert c.lr_at(0) == pytest.approx(1e-3)
    assert c.lr_at(50) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert c.lr_at(100) == pytest.approx(1e-4) and c.lr_at(500) == pytest.approx(1e-4)
    k = LRSchedule("constant", lr=2e-4, total_steps=10, warmup_steps=2)
    assert [k.lr_at(i) for i in range(4)] == pytest.approx([1e-4, 2e-4, 2e-4, 2e-4])
    assert k.state_dict()["name"] == "constant"


def test_bad_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        LRSchedule("linear", lr=1, total_steps=1)
    with pytest.raises(ValueError, match="stage_steps"):
        LRSchedule("staged", lr=1, total_steps=1, stage_lrs=[1, 2], stage_steps=[])
