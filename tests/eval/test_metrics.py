"""Metrics agree with lm-eval's own functions on the same inputs."""

from __future__ import annotations

import math
import random

import pytest

from deepwhale.eval import metrics

lm_metrics = pytest.importorskip("lm_eval.api.metrics")


def test_stderr_and_perplexities_match_lm_eval():
    rng = random.Random(0)
    for n in (2, 3, 20, 101):
        values = [float(rng.random() < 0.3) for _ in range(n)]
        assert metrics.mean_stderr(values) == pytest.approx(
            lm_metrics.mean_stderr(values), rel=1e-12
        )
    lls = [-rng.uniform(10, 500) for _ in range(7)]
    counts = [rng.randint(5, 300) for _ in range(7)]
    ours = metrics.perplexity_metrics(
        lls, tokens=sum(counts), words=sum(counts), nbytes=sum(counts)
    )
    pairs = list(zip(lls, counts, strict=True))
    assert ours["word_perplexity"] == pytest.approx(
        lm_metrics.weighted_perplexity(pairs), rel=1e-12
    )
    assert ours["bits_per_byte"] == pytest.approx(lm_metrics.bits_per_byte(pairs), rel=1e-12)
    assert math.isnan(metrics.mean_stderr([1.0]))


def test_multiple_choice_and_counts():
    # acc picks the highest log-likelihood; acc_norm divides by the choice's length first
    m = metrics.multiple_choice_metrics([-4.0, -6.0], ["ab", "abcdef"], gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0}
    assert metrics.argmax([1.0, 3.0, 3.0]) == 1  # numpy's first-maximum rule
    assert metrics.count_words("a  b\nc") == 3 and metrics.count_bytes("é") == 2
    with pytest.raises(ValueError, match="gold"):
        metrics.multiple_choice_metrics([-1.0], ["a"], gold=2)
    with pytest.raises(ValueError, match="empty corpus"):
        metrics.perplexity_metrics([-1.0], 0, 1, 1)
