"""DeepSeek-V3.2 (``deepseek_v32``): fp32 parity with transformers' port for prefill, token-by-token
cached decode and greedy generation, on tiny random checkpoints saved by ``save_pretrained``.

The indexer scores are ``sum_j w_j ReLU(q_j . k)``; with few indexer heads a key can score exactly
0 for several tokens, and transformers' ``topk`` then breaks the tie differently for different
sequence lengths (its own cached decode then disagrees with its prefill). Ours give a tie to the
earlier token, the same at every length, so they agree with transformers exactly where its
``topk`` has no tie to break. The cases use 8 or 16 indexer heads, where no tie falls at the
top-k boundary on these inputs (with 4 heads, or 8 heads of width 8, one does; the release has
64 heads of 128); ``test_ties_*`` checks that ours choose the same tokens whatever the length.
"""

from __future__ import annotations

import pytest
import torch

from deepwhale.checkpoint.io import load_model
from deepwhale.model.cache import IndexedMLACache, cache_bytes_per_token, make_cache
from deepwhale.model.config import ConfigError, ModelConfig
from tests.helpers import make_hf_model

V32 = dict(q_lora_rank=24, index_n_heads=8, index_head_dim=16, n_group=2, topk_group=1)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
#: (overrides, sparse): sparse cases pick fewer tokens than the 20-token inputs hold
CASES = {
    "topk4-moe": ({**V32, "index_topk": 4}, True),
    "topk64-dense-attention": ({**V32, "index_topk": 64}, False),
    "topk6-dense-mlp": ({**V32, "index_topk": 6, "first_k_dense_replace": 3}, True),
    "topk5-yarn-4groups": (
        {**V32, "index_topk": 5, "n_group": 4, "topk_group": 2, "rope_parameters": YARN},
        True,
    ),
    "topk3-index-dim-eq-rope": (
        {**V32, "index_topk": 3, "index_head_dim": 8, "index_n_heads": 16},
        True,
    ),
}
LENGTH = 20


def _ids(batch: int = 2, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_and_ours(case, tmp_path):
    overrides, _ = CASES[case]
    hf = make_hf_model("deepseek_v32", tmp_path, **overrides)
    return hf, load_model(tmp_path)


def _hf_token_by_token(hf, ids):
    out = hf(ids[:, :1], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(1, ids.shape[1]):
        out = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def _ours_token_by_token(ours, ids, caches):
    b = ids.shape[0]
    steps = [
        ours(ids[:, t : t + 1], positions=torch.full((b, 1), t), caches=caches)
        for t in range(ids.shape[1])
    ]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match_transformers(case, tmp_path):
    hf, ours = _hf_and_ours(case, tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{case}: max abs diff {diff:.3g}"
        assert expected.abs().max() > 0.1
        for layer in ours.model.layers:  # the same weights attending densely
            layer.self_attn.indexer.topk = LENGTH
        dense_gap = (ours(ids) - expected).abs().max().item()
    if CASES[case][1]:
        assert dense_gap > 1e-2, f"{case}: the top-k selection changed nothing"
    else:
        assert dense_gap <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_token_by_token_decode_matches_transformers(case, tmp_path):
    """Every token through our static cache (the indexer keys cached beside MLA's latent) equals
    transformers' own cached decode and its one-pass forward."""
    hf, ours = _hf_and_ours(case, tmp_path)
    ids = _ids()
    caches = make_cache(ours.config, batch=2, max_seq_len=32)
    assert all(isinstance(c, IndexedMLACache) for c in caches)
    with torch.no_grad():
        hf_full = hf(ids).logits
        hf_steps = _hf_token_by_token(hf, ids)
        got = _ours_token_by_token(ours, ids, caches)
    assert (hf_steps - hf_full).abs().max().item() <= 1e-4  # no indexer ties on these inputs
    diff = (got - hf_steps).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("case", ["topk4-moe", "topk5-yarn-4groups"])
def test_chunked_prefill_then_decode_and_absorbed_equals_naive(case, tmp_path):
    """A 12-token prefill chunk then single steps, in the naive (mask) and absorbed (gather only
    the selected latents) forms, equal the one-pass forward."""
    hf, ours = _hf_and_ours(case, tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = hf(ids).logits
        for impl in ("naive", "absorb", "auto"):
            for layer in ours.model.layers:
                layer.self_attn.attn_impl = impl
            caches = make_cache(ours.config, batch=2, max_seq_len=32)
            steps = [ours(ids[:, :12], caches=caches)]
            for t in range(12, LENGTH):
                steps.append(
                    ours(ids[:, t : t + 1], positions=torch.full((2, 1), t), caches=caches)
                )
            diff = (torch.cat(steps, dim=1) - expected).abs().max().item()
            assert diff <= 1e-4, f"{case} {impl}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("case", ["topk4-moe", "topk6-dense-mlp", "topk64-dense-attention"])
def test_greedy_generation_matches_transformers_generate(case, tmp_path):
    from deepwhale.inference.generate import decode_one_token, prefill

    hf, ours = _hf_and_ours(case, tmp_path)
    prompt = _ids(batch=1, length=7, seed=3)
    n_new = 16
    with torch.no_grad():
        expected = hf.generate(
            prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, top_k=None
        )[0, 7:].tolist()
    caches = make_cache(ours.config, 1, 7 + n_new)
    logits = prefill(ours, prompt, caches)
    got = []
    for step in range(n_new):
        token = int(logits.argmax(-1))
        got.append(token)
        logits = decode_one_token(ours, torch.tensor([[token]]), 7 + step, caches)
    assert got == expected


def test_from_pretrained_loads_a_transformers_folder(tmp_path):
    """``DeepSeekModel.from_pretrained`` reads the folder transformers wrote (indexer keys are an
    identity map; ``weights_proj`` stays fp32 in a bf16 load, as transformers keeps it)."""
    from deepwhale.inference import DeepSeekModel

    hf, _ = _hf_and_ours("topk4-moe", tmp_path)
    m = DeepSeekModel.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert m.module.config.model_type == "deepseek_v32"
    ids = _ids()
    with torch.no_grad():
        assert (m(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    bf16 = load_model(tmp_path, dtype=torch.bfloat16)
    indexer = bf16.model.layers[1].self_attn.indexer
    assert indexer.weights_proj.weight.dtype == torch.float32
    assert indexer.wq_b.weight.dtype == torch.bfloat16


def test_save_pretrained_round_trips_through_transformers(tmp_path):
    import transformers

    from deepwhale.checkpoint.io import save_model

    hf, ours = _hf_and_ours("topk4-moe", tmp_path / "a")
    save_model(ours, tmp_path / "b")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "b", dtype=torch.float32
    ).eval()
    ids = _ids()
    with torch.no_grad():
        assert (again(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_ties_go_to_the_earlier_token_whatever_the_length():
    """A cached decode, a padded batch and a one-pass prefill choose the same tokens."""
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM

    model = CausalLM(flavour_config("debug-v32", index_n_heads=2, index_topk=3)).eval()
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        steps = _ours_token_by_token(model, ids, make_cache(model.config, 1, 40))
        assert (model(ids[:, :10]) - full[:, :10]).abs().max().item() <= 1e-4
    assert (steps - full).abs().max().item() <= 1e-4
    indexer = model.model.layers[0].self_attn.indexer
    scores = torch.tensor([[[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]]])
    indexer.scores = lambda *a: scores
    picked = indexer.select(None, None, None, None, None, torch.ones(1, 1, 6, dtype=torch.bool))
    assert picked.tolist() == [[[1, 4, 0]]]


def test_cache_holds_the_indexer_keys_and_nothing_more():
    from deepwhale.model.flavours import flavour_config

    v32, v3 = flavour_config("bench-v32-134m"), flavour_config("bench-v3-134m")
    got = cache_bytes_per_token(v32, dtype_bytes=2)
    layers = v32.num_hidden_layers
    assert got["mla"] == cache_bytes_per_token(v3, dtype_bytes=2)["cache"] == (128 + 32) * 2 * 8
    assert got["cache"] == got["mla"] + v32.index_head_dim * 2 * layers  # 3,584 bytes
    assert got["mha"] == 8 * (96 + 64) * 2 * layers  # 20,480 bytes
    cache = make_cache(v32, batch=2, max_seq_len=10, dtype=torch.bfloat16)
    assert sum(c.nbytes() for c in cache) == got["cache"] * 2 * 10
    rows = cache[0].rows(1, 2)
    rows.update_index(torch.tensor([[0]]), torch.ones(1, 1, v32.index_head_dim))
    assert cache[0].index_k[1, 0].eq(1).all() and cache[0].index_k[0].eq(0).all()
    cache[0].copy_row(1, 0, 1)
    assert cache[0].index_k[0, 0].eq(1).all()


BASE = dict(
    model_type="deepseek_v32",
    vocab_size=8,
    hidden_size=8,
    intermediate_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    q_lora_rank=4,
    kv_lora_rank=4,
    qk_nope_head_dim=2,
    qk_rope_head_dim=2,
    v_head_dim=2,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=4,
    n_group=2,
    topk_group=1,
)


def test_config_defaults_and_derived_values():
    c = ModelConfig(**BASE, first_k_dense_replace=1)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
    assert c.mlp_layer_types == ["dense", "sparse"] and c.is_sparse_attention and c.is_mla
    assert [c.is_moe_layer(i) for i in range(2)] == [False, True]
    assert (c.topk_method, c.scoring_func, c.norm_topk_prob, c.rope_interleave) == (
        "noaux_tc",
        "sigmoid",
        True,
        True,
    )
    hf = c.to_hf()
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"] and "rope_interleave" not in hf
    assert ModelConfig.from_hf(hf) == c


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"q_lora_rank": None}, "needs q_lora_rank"),
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"topk_method": "greedy"}, "unsupported topk_method 'greedy'"),
        ({"scoring_func": "softmax"}, "unsupported scoring_func 'softmax'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ({"mlp_layer_types": ["dense"]}, "one entry per layer"),
        ({"mlp_layer_types": ["dense", "hash"]}, "unsupported mlp_layer_types"),
        ({"index_head_dim": 1}, "index_head_dim"),
        ({"index_topk": 0}, "index_topk must be a positive integer"),
        ({"extra": {"layer_types": ["indexed_attention", "shared"]}}, "layer_types"),
    ],
)
def test_config_refuses_what_it_does_not_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **overrides})


def test_index_keys_on_another_model_type_are_refused():
    base = {**BASE, "model_type": "deepseek_v3"}
    with pytest.raises(ConfigError, match="index_topk is a deepseek_v32 key"):
        ModelConfig(**base, index_topk=4)
