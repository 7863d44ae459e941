"""Teacher-forced prompt logprobs (``echo``): equal to the scorer's and the engine's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from deepwhale.api import DeepSeekModel
from deepwhale.eval.scoring import score_requests
from deepwhale.inference import prompt_logprobs as pl
from deepwhale.inference.engine import Engine
from deepwhale.inference.prompt_logprobs import prompt_logprobs
from deepwhale.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def stories():
    return DeepSeekModel.from_pretrained()


def test_sums_equal_the_scorer(stories):
    """The continuation's entries sum to score_requests' log-likelihood; greedy flags agree."""
    ids = stories.tokenizer.encode("Once upon a time there was a little dog named Max")
    got = prompt_logprobs(stories.module, ids, top_n=1)
    assert got[0] is None and len(got) == len(ids)
    assert [g.token_id for g in got[1:]] == ids[1:]
    for cut in (1, 4, len(ids) - 1):
        (score,) = score_requests(stories.module, [(ids[:cut], ids[cut:])], max_len=512)
        total = sum(g.logprob for g in got[cut:])
        assert math.isclose(total, score.logprob, abs_tol=1e-4)
        greedy = all(g.top[0][0] == g.token_id for g in got[cut:])
        assert greedy == score.is_greedy


def test_top_alternatives_are_sorted_and_match_a_direct_softmax(stories):
    ids = stories.tokenizer.encode("The cat sat on the mat")
    got = prompt_logprobs(stories.module, ids, top_n=5)
    with torch.inference_mode():
        logits = stories.module(torch.tensor([ids]))[0].float()  # (T, V)
    ref = torch.log_softmax(logits, dim=-1)
    for t in range(1, len(ids)):
        entry = got[t]
        assert len(entry.top) == 5
        vals = [v for _, v in entry.top]
        assert vals == sorted(vals, reverse=True)
        assert math.isclose(entry.logprob, float(ref[t - 1, ids[t]]), abs_tol=1e-5)
        assert entry.top[0][0] == int(ref[t - 1].argmax())


def test_generated_tokens_score_as_the_engine_saw_them(stories):
    """Echoing prompt + greedy output gives the engine's per-token logprobs (cache vs no cache)."""
    ids = stories.tokenizer.encode("Lily and Ben went to the park.")
    eng = Engine(stories.module, stories.tokenizer, max_batch_size=1, max_seq_len=128)
    req = eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=6), logprobs=2)
    while eng.has_work():
        eng.step()
    seq = req.sequences[0]
    got = prompt_logprobs(stories.module, ids + seq.output_ids, top_n=2)
    for mine, theirs in zip(got[len(ids) :], seq.logprobs, strict=True):
        assert mine.token_id == theirs.token_id
        assert math.isclose(mine.logprob, theirs.logprob, abs_tol=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]


def test_chunks_join_seamlessly(stories, monkeypatch):
    ids = stories.tokenizer.encode("Tom had a red ball. " * 6)
    whole = prompt_logprobs(stories.module, ids, top_n=3)
    monkeypatch.setattr(pl, "CHUNK", 7)
    parts = prompt_logprobs(stories.module, ids, top_n=3)
    for p, w in zip(parts[1:], whole[1:], strict=True):  # matmul shapes differ: close, not equal
        assert p.token_id == w.token_id
        assert [t for t, _ in p.top] == [t for t, _ in w.top]
        assert math.isclose(p.logprob, w.logprob, abs_tol=1e-5)


def test_one_token_and_bad_input(stories):
    assert prompt_logprobs(stories.module, [5], top_n=3) == [None]
    with pytest.raises(ValueError, match="empty"):
        prompt_logprobs(stories.module, [])
    with pytest.raises(ValueError, match="0..20"):
        prompt_logprobs(stories.module, [1, 2], top_n=21)
    with pytest.raises(ValueError, match="token ids must be in"):
        prompt_logprobs(stories.module, [1, 10**9])
    assert not stories.module.training
