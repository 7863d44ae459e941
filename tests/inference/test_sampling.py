"""Sampling semantics: greedy, temperature, top-k, top-p, min-p, penalties and seeds."""

from __future__ import annotations

import pytest
import torch

from deepwhale.inference.sampling import SamplingParams, apply_penalties, filter_logits, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def _kept(params: SamplingParams) -> list[int]:
    out = filter_logits(LOGITS, params)[0]
    return [i for i, v in enumerate(out.tolist()) if v != float("-inf")]


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1)), logits.argmax(-1))


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert _kept(SamplingParams(top_k=2)) == [0, 1]
    assert _kept(SamplingParams(top_p=0.5)) == [0]  # the first token alone reaches 0.5
    assert _kept(SamplingParams(top_p=0.7)) == [0, 1]
    assert _kept(SamplingParams(top_p=0.9)) == [0, 1, 2]
    assert _kept(SamplingParams(top_p=1.0)) == [0, 1, 2, 3, 4]
    assert _kept(SamplingParams(min_p=0.2)) == [0, 1, 2]  # 0.07 < 0.2 * 0.5
    assert _kept(SamplingParams(top_k=4, top_p=0.9, min_p=0.2)) == [0, 1, 2]


def test_temperature_sharpens_and_flattens():
    cold = filter_logits(LOGITS, SamplingParams(temperature=0.5)).softmax(-1)[0, 0]
    hot = filter_logits(LOGITS, SamplingParams(temperature=2.0)).softmax(-1)[0, 0]
    assert cold > 0.5 > hot


def test_seed_reproduces_and_distribution_matches():
    logits = LOGITS.expand(4000, -1)
    p = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, p, p.make_generator())
    b = sample(logits, p, p.make_generator())
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=5).float() / len(a)
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.03)
    c = sample(logits, SamplingParams(seed=8), SamplingParams(seed=8).make_generator())
    assert not torch.equal(a, c)


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    prompt, out = torch.tensor([0]), torch.tensor([1, 2, 2])
    rep = apply_penalties(logits, prompt, out, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [1.0, -4.0, 0.5, 0.5]
    pf = apply_penalties(
        logits, prompt, out, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    )
    assert pf.tolist() == [2.0, -2.75, 0.0, 0.5]  # token 2 seen twice: 1 - 0.5 - 2*0.25
    assert torch.equal(apply_penalties(logits, prompt, out, SamplingParams()), logits)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 2),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("max_new_tokens", 0),
    ],
)
def test_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_string_normalised():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["", "x"]).stop == ["x"]
