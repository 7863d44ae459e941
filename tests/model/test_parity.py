"""fp32 logits parity with transformers for every layout, routing method and RoPE variant."""

from __future__ import annotations

import pytest
import torch

from deepwhale.checkpoint.io import load_model
from deepwhale.model.cache import make_cache
from tests.helpers import make_hf_model

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
CASES = {
    "llama-default": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True}),
    "llama-linear": (
        "llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}},
    ),
    "llama-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 500000.0,
            }
        },
    ),
    "llama-yarn": ("llama", {"rope_parameters": YARN}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-yarn": ("qwen2", {"tie_word_embeddings": True, "rope_parameters": YARN}),
    "v2-greedy-no-qlora": ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy"}),
    "v2-group-limited": (
        "deepseek_v2",
        {
            "q_lora_rank": 24,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 16.0,
        },
    ),
    "v2-yarn-mscale": (
        "deepseek_v2",
        {
            "q_lora_rank": 24,
            "rope_parameters": {
                **YARN,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        },
    ),
    "v3-noaux-tc": (
        "deepseek_v3",
        {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    ),
    "v3-no-qlora-no-norm": (
        "deepseek_v3",
        {"q_lora_rank": None, "n_group": 2, "topk_group": 1, "norm_topk_prob": False},
    ),
    "v3-rotate-half": (
        "deepseek_v3",
        {"q_lora_rank": 24, "n_group": 2, "topk_group": 2, "rope_interleave": False},
    ),
    "v3-yarn-mscale": (
        "deepseek_v3",
        {
            "q_lora_rank": 24,
            "n_group": 4,
            "topk_group": 2,
            "rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        },
    ),
}


def _ids(vocab: int, batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    hf = make_hf_model(model_type, tmp_path, **overrides)
    ours = load_model(tmp_path)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs diff {diff:.3g}"
    # the tensors are not trivially small: a wrong layer would show
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("case", ["llama-default", "qwen2", "v2-group-limited", "v3-noaux-tc"])
def test_incremental_decode_matches_full_forward(case, tmp_path):
    """Prefill + one-token decode steps through the static cache give the full-forward logits."""
    model_type, overrides = CASES[case]
    hf = make_hf_model(model_type, tmp_path, **overrides)
    ours = load_model(tmp_path)
    ids = _ids(hf.config.vocab_size, batch=2, length=20)
    caches = make_cache(ours.config, batch=2, max_seq_len=32)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :12], caches=caches)]
        for t in range(12, 20):
            pos = torch.full((2, 1), t)
            steps.append(ours(ids[:, t : t + 1], positions=pos, caches=caches))
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["v2-greedy-no-qlora", "v3-noaux-tc", "v3-yarn-mscale"])
def test_absorbed_mla_matches_naive(case, tmp_path):
    """MLA with W_UK/W_UV absorbed (DeepSeek-V2 §2.1.3) equals the naive expansion in fp32."""
    model_type, overrides = CASES[case]
    make_hf_model(model_type, tmp_path, **overrides)
    ours = load_model(tmp_path)
    ids = _ids(ours.config.vocab_size, batch=2, length=24)
    outs = {}
    for impl in ("naive", "absorb"):
        for layer in ours.model.layers:
            layer.self_attn.attn_impl = impl
        caches = make_cache(ours.config, batch=2, max_seq_len=32)
        with torch.no_grad():
            steps = [ours(ids[:, :16], caches=caches)]
            for t in range(16, 24):
                steps.append(
                    ours(ids[:, t : t + 1], positions=torch.full((2, 1), t), caches=caches)
                )
        outs[impl] = torch.cat(steps, dim=1)
    assert (outs["absorb"] - outs["naive"]).abs().max().item() <= 1e-4
    assert outs["naive"].abs().max() > 0.1


def test_v3_single_expert_normalises_like_transformers(tmp_path):
    """V3 renormalises even with k=1 (transformers and DeepSeek-V3 inference/model.py)."""
    hf = make_hf_model(
        "deepseek_v3",
        tmp_path,
        num_experts_per_tok=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    )
    ours = load_model(tmp_path)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_v2_normalise_or_scale_follows_the_reference():
    """DeepSeek-V2's gate: renormalise if norm_topk_prob and k > 1, otherwise scale."""
    from deepwhale.model.config import ModelConfig
    from deepwhale.model.moe import Gate

    base = dict(
        model_type="deepseek_v2",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        kv_lora_rank=4,
        qk_nope_head_dim=2,
        qk_rope_head_dim=2,
        v_head_dim=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=4,
        routed_scaling_factor=3.0,
    )
    x = torch.randn(5, 8)
    for norm in (True, False):
        gate = Gate(ModelConfig(**base, norm_topk_prob=norm))
        torch.nn.init.normal_(gate.weight)
        w, idx, scores = gate(x)
        raw = scores.gather(1, idx)
        expected = raw / raw.sum(-1, keepdim=True) if norm else raw * 3.0
        assert torch.allclose(w, expected)


def test_blocked_attention_matches_sdpa():
    """The online-softmax key-block recurrence equals SDPA, with GQA and offset query blocks."""
    import torch.nn.functional as F

    from deepwhale.model.attention import attention_mask, blocked_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 24, 16, generator=g)
    k = torch.randn(2, 2, 100, 16, generator=g)
    v = torch.randn(2, 2, 100, 12, generator=g)
    q_pos = torch.arange(76, 100).expand(2, -1)  # the last chunk of a 100-token prefill
    k_pos = torch.arange(100)
    ref = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask(q_pos, k_pos), scale=0.3, enable_gqa=True
    )
    got = blocked_attention(q, k, v, q_pos, k_pos, 0.3, block=17)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("flavour", ["debug-v3", "debug-llama"])
def test_long_prefill_path_matches_full_forward(flavour, monkeypatch):
    """With a tiny ATTN_BLOCK the long-prompt paths (blocked GQA, blocked absorbed MLA) run on a
    300-token chunked prefill and still equal the one-pass forward."""
    import deepwhale.model.attention as attention
    from deepwhale.inference.engine import Engine
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM

    model = CausalLM(flavour_config(flavour)).eval()
    model.init_weights(std=0.08, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids[None])[0, -1]  # SDPA / naive MLA, one pass
    monkeypatch.setattr(attention, "ATTN_BLOCK", 32)
    eng = Engine(model, None, max_batch_size=1, max_seq_len=512, prefill_chunk=96)
    chunked = eng._prefill(ids, slot=0)
    assert (chunked - full).abs().max().item() <= 1e-4
