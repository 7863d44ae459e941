"""Greedy speculative decoding is token-identical to plain greedy decoding, whatever the draft."""

from __future__ import annotations

import copy

import pytest
import torch

from deepwhale.inference.generate import PromptTooLongError, generate_stream
from deepwhale.inference.sampling import SamplingParams
from deepwhale.inference.speculative import (
    greedy_decode,
    speculative_decode,
    truncated_draft,
)
from deepwhale.model.flavours import flavour_config
from deepwhale.model.mtp import MultiTokenPredictor
from deepwhale.model.transformer import CausalLM

PROMPTS = [[1, 5, 7], [1] + list(range(40, 60)), [3]]


def _random(flavour: str, seed: int = 0, **overrides) -> CausalLM:
    model = CausalLM(flavour_config(flavour, **overrides)).eval()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def target():
    """A debug-v3 model (MLA + MoE) with one random MTP module attached, as load_mtp builds it."""
    model = _random("debug-v3", num_nextn_predict_layers=1, max_position_embeddings=128)
    model.mtp = MultiTokenPredictor(model.config).eval()
    model.mtp.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def _never_right(target: CausalLM) -> CausalLM:
    """The target with its lm_head negated: it drafts the target's argmin, never its argmax."""
    draft = copy.deepcopy(target)
    with torch.no_grad():
        draft.lm_head.weight.neg_()
    return draft


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "long", "one"])
def test_mtp_draft_matches_greedy(target, prompt, k):
    expected = greedy_decode(target, prompt, 24)
    result = speculative_decode(target, prompt, 24, draft="mtp", k=k)
    assert result.tokens == expected and len(expected) == 24
    s = result.stats
    assert s.drafted == sum(s.proposed_at) and s.accepted == sum(s.accepted_at)
    assert s.rounds + s.accepted >= 24 - 1  # every round adds its accepted drafts plus one


@pytest.mark.parametrize("k", [1, 3, 5])
def test_target_as_its_own_draft_accepts_everything(target, k):
    prompt = PROMPTS[0]
    result = speculative_decode(target, prompt, 25, draft=target, k=k)
    assert result.tokens == greedy_decode(target, prompt, 25)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.rounds == -(-24 // (k + 1))  # the first token comes from the prefill


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_that_is_always_wrong_still_gives_greedy(target, k):
    prompt = PROMPTS[1]
    result = speculative_decode(target, prompt, 20, draft=_never_right(target), k=k)
    assert result.tokens == greedy_decode(target, prompt, 20)
    assert result.stats.accepted == 0 and result.stats.rounds == 19


@pytest.mark.parametrize("k", [2, 5])
def test_separate_and_early_exit_drafts_match_greedy(target, k):
    other = _random("debug-llama", seed=3, max_position_embeddings=128)  # same vocabulary
    for draft in (other, truncated_draft(target, 1), truncated_draft(target, 2)):
        for prompt in PROMPTS[:2]:
            got = speculative_decode(target, prompt, 30, draft=draft, k=k).tokens
            assert got == greedy_decode(target, prompt, 30)


def test_eos_and_budget_stop_like_greedy(target):
    prompt = PROMPTS[0]
    plain = greedy_decode(target, prompt, 24)
    eos = {plain[9]}  # stops at its first occurrence, not included
    expected = greedy_decode(target, prompt, 24, eos_token_ids=eos)
    assert len(expected) <= 9 and plain[len(expected)] in eos
    for draft in ("mtp", target):
        for k in (1, 3, 8):
            r = speculative_decode(target, prompt, 24, draft=draft, k=k, eos_token_ids=eos)
            assert r.tokens == expected
            # a budget smaller than k, and one token
            assert speculative_decode(target, prompt, 2, draft=draft, k=k).tokens == plain[:2]
            assert speculative_decode(target, prompt, 1, draft=draft, k=k).tokens == plain[:1]
    # the context bounds the budget as for plain decoding
    long_prompt = list(range(1, 120))
    got = speculative_decode(target, long_prompt, 50, draft="mtp", k=4).tokens
    assert got == greedy_decode(target, long_prompt, 50) and len(got) == 128 - 119


def test_matches_generate_stream_on_the_bundled_model():
    """On the real stories260K model: speculative output equals generate_stream at temperature 0."""
    from deepwhale.inference.deepseek import DeepSeekModel

    model = DeepSeekModel.from_pretrained(device="cpu")
    target, tok = model.module, model.tokenizer
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    stream = [c.token_id for c in generate_stream(target, tok, prompt, params)]
    stream = [t for t in stream if t is not None]
    result = speculative_decode(target, prompt, 40, draft=truncated_draft(target, 2), k=3)
    assert result.tokens == stream and len(stream) == 40
    assert 0 < result.stats.acceptance_rate <= 1


def test_bad_arguments_are_precise_errors(target):
    plain = _random("debug-llama")
    with pytest.raises(ValueError, match="no MTP module: load it with load_mtp=True"):
        speculative_decode(plain, [1, 2], 4, draft="mtp")
    with pytest.raises(ValueError, match="draft must be 'mtp' or a CausalLM"):
        speculative_decode(target, [1, 2], 4, draft="eagle")
    with pytest.raises(ValueError, match=r"k \(draft tokens per round\) must be an integer >= 1"):
        speculative_decode(target, [1, 2], 4, k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        speculative_decode(target, [1, 2], 0)
    with pytest.raises(PromptTooLongError, match="empty"):
        speculative_decode(target, [], 4)
    with pytest.raises(PromptTooLongError, match="context is 128 tokens"):
        speculative_decode(target, [1] * 128, 4)
    big = _random("debug-llama", vocab_size=600)
    with pytest.raises(ValueError, match=r"vocabulary \(600\) is larger than the target's \(512\)"):
        speculative_decode(target, [1, 2], 4, draft=big)
    short = _random("debug-llama", max_position_embeddings=16)
    with pytest.raises(ValueError, match="draft model's context"):
        speculative_decode(target, [1, 2], 40, draft=short)
    with pytest.raises(ValueError, match="num_layers must be in 1..2"):
        truncated_draft(target, 3)


def test_mtp_first_draft_equals_a_cache_free_recompute(target, monkeypatch):
    """After any accept/reject pattern, the MTP cache holds exactly the committed positions: its
    first draft each round equals the MTP module run from scratch over the committed tokens."""
    from deepwhale.inference import speculative

    seen = []
    propose = speculative.MTPDrafter.propose

    def spy(self, tokens, k, choose=None):
        drafts = propose(self, tokens, k, choose)
        seen.append((list(tokens), drafts[0]))
        return drafts

    monkeypatch.setattr(speculative.MTPDrafter, "propose", spy)
    speculative_decode(target, PROMPTS[1], 30, draft="mtp", k=3)
    assert len(seen) > 5
    with torch.no_grad():
        for tokens, first in seen:
            ids = torch.tensor([tokens])
            _, logits = target.mtp(ids[:, 1:], target.hidden_states(ids[:, :-1]))
            assert int(logits[0, -1].argmax()) == first


def test_mtp_loaded_from_a_checkpoint_drafts(tmp_path):
    from deepwhale.checkpoint.io import load_model
    from tests.helpers import make_hf_model
    from tests.model.test_mtp import V3, add_hf_mtp

    add_hf_mtp(make_hf_model("deepseek_v3", tmp_path, **V3), tmp_path)
    model = load_model(tmp_path, load_mtp=True)
    for k in (1, 3):
        got = speculative_decode(model, [1, 2, 3], 20, draft="mtp", k=k)
        assert got.tokens == greedy_decode(model, [1, 2, 3], 20)


def test_v32_mtp_draft_matches_greedy_past_index_topk():
    """DeepSeek-V3.2 (sparse attention, index_topk 16): the MTP layer and the verify step select
    their top-k cached tokens like plain decoding does, so the output is still greedy's."""
    model = _random("debug-v32", num_nextn_predict_layers=1, max_position_embeddings=128)
    model.mtp = MultiTokenPredictor(model.config).eval()
    model.mtp.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    assert type(model.mtp.layer(0).mlp).__name__ == "MoE"
    prompt = list(range(1, 60))  # longer than index_topk
    for k in (1, 3):
        got = speculative_decode(model, prompt, 24, draft="mtp", k=k).tokens
        assert got == greedy_decode(model, prompt, 24)


# ------------------------------------------------------------------ sampling (rejection rule)
def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def test_accept_reject_keeps_the_target_distribution():
    """Leviathan et al.'s rule with fixed rows p0, p1 and a draft far from them: the first two
    output tokens are distributed as p0 x p1 (seeded, 20,000 trials)."""
    from deepwhale.inference.speculative import accept_reject

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.2, 0.4], [0.2] * 5])
    q = torch.tensor([[0.05, 0.1, 0.15, 0.2, 0.5], [0.4, 0.3, 0.1, 0.1, 0.1]])
    assert _tv(p[0], q[0]) > 0.4 and _tv(p[1], q[1]) > 0.4  # a rule that keeps drafts would fail
    counts = torch.zeros(5, 5)
    trials = 20_000
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        a, tok = accept_reject(p, q, drafts, g)
        out = (drafts[:a] + [tok])[:2]
        if len(out) < 2:  # rejected at 0: the next token would come from the next round
            out.append(int(torch.multinomial(p[1], 1, generator=g)))
        counts[out[0], out[1]] += 1
    assert _tv(counts.flatten() / trials, torch.outer(p[0], p[1]).flatten()) < 0.03


def _exact_marginals(model: CausalLM, prompt: list[int], n: int, temperature: float):
    """P(t_j) for j = 1..n under plain sampling, by enumerating every prefix (tiny vocabulary)."""
    v = model.config.vocab_size
    marg, paths, probs = [], [[]], torch.ones(1)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + pth for pth in paths]))[:, -1]
        step = (logits / temperature).softmax(-1) * probs[:, None]  # (paths, V)
        marg.append(step.sum(0))
        paths = [pth + [t] for pth in paths for t in range(v)]
        probs = step.flatten()
    return marg


def test_speculative_sampling_matches_plain_sampling_marginals():
    """End to end, seeded: tokens 1-3 sampled speculatively with a different draft model have the
    target's marginals (exact, by enumeration), not the draft's."""
    from deepwhale.inference.sampling import SamplingParams

    tgt = _random("debug-llama", seed=4, vocab_size=6)
    with torch.no_grad():
        tgt.lm_head.weight.mul_(3)  # distinct, not degenerate, distributions
    drf = _random("debug-llama", seed=5, vocab_size=6)
    with torch.no_grad():
        drf.lm_head.weight.mul_(3)
    prompt, temp, runs = [1, 2, 3], 0.8, 800
    exact = _exact_marginals(tgt, prompt, 3, temp)
    draft_m = _exact_marginals(drf, prompt, 3, temp)
    assert max(_tv(a, b) for a, b in zip(exact[1:], draft_m[1:], strict=True)) > 0.2
    counts = torch.zeros(3, 6)
    accepted = 0
    for seed in range(runs):
        params = SamplingParams(temperature=temp, seed=seed)
        r = speculative_decode(tgt, prompt, 3, draft=drf, k=2, params=params)
        accepted += r.stats.accepted
        for j, t in enumerate(r.tokens):
            counts[j, t] += 1
    assert 0 < accepted < 2 * runs  # both branches of the rule ran
    for j in range(3):
        assert _tv(counts[j] / runs, exact[j]) < 0.06, j


def test_speculative_sampling_is_seeded_and_self_draft_accepts_all(target):
    from deepwhale.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    a = speculative_decode(target, PROMPTS[0], 30, draft=target, k=3, params=params)
    b = speculative_decode(target, PROMPTS[0], 30, draft=target, k=3, params=params)
    c = speculative_decode(target, PROMPTS[0], 30, draft="mtp", k=3, params=params)
    assert a.tokens == b.tokens and len(a.tokens) == 30 and len(c.tokens) == 30
    assert a.stats.acceptance_rate > 0.95  # p == q up to rounding: drafts are kept
    other = SamplingParams(temperature=0.9, top_p=0.95, seed=4)
    assert (
        speculative_decode(target, PROMPTS[0], 30, draft=target, k=3, params=other).tokens
        != a.tokens
    )
    greedy = SamplingParams(temperature=0)
    assert speculative_decode(target, PROMPTS[0], 20, k=2, params=greedy).tokens == greedy_decode(
        target, PROMPTS[0], 20
    )
    with pytest.raises(ValueError, match="does not apply repetition"):
        speculative_decode(target, [1], 4, params=SamplingParams(repetition_penalty=1.2))


def test_facade_generate_speculative_equals_generate():
    from deepwhale.checkpoint.hub import DEFAULT_MODEL
    from deepwhale.inference.deepseek import DeepSeekModel

    model = DeepSeekModel.from_pretrained(device="cpu")
    kw = dict(temperature=0, max_new_tokens=48)
    plain = model.generate("Once upon a time", **kw)
    text, stats = model.generate_speculative(
        "Once upon a time", draft=truncated_draft(model.module, 2), k=3, **kw
    )
    assert text == plain and stats.rounds > 0
    # a draft folder (here the same model: every draft is kept), and stop strings
    stop = plain.split()[5]
    text, stats = model.generate_speculative(
        "Once upon a time", draft=DEFAULT_MODEL, k=4, stop=[stop], **kw
    )
    assert (
        text == model.generate("Once upon a time", stop=[stop], **kw) == plain[: plain.find(stop)]
    )
    assert stats.acceptance_rate == 1.0
    with pytest.raises(ValueError, match="no MTP module"):
        model.generate_speculative("Once", max_new_tokens=4)
