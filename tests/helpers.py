"""Shared test helpers: tiny random transformers models saved in HF layout, shared data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
)
TINY_MLA = dict(
    TINY,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    moe_intermediate_size=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
)


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def make_hf_model(model_type: str, out: Path, seed: int = 0, std: float = 0.15, **overrides):
    """Build a tiny random transformers model of ``model_type``, save it to ``out``, return it.

    Every parameter and the router bias get N(0, std) values so routing and norms matter.
    """
    import transformers

    cls_cfg, cls_model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
        "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    }[model_type]
    base = TINY_MLA if model_type.startswith("deepseek") else dict(TINY, num_key_value_heads=2)
    cfg = getattr(transformers, cls_cfg)(**{**base, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_model)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(out)
    return model
