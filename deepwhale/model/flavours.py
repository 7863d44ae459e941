"""Named model sizes: tiny debug flavours for tests and docs, and the shapes of real releases.

``debug-v3`` is a DeepSeek-V3-shaped model (MLA with ``q_lora_rank``, DeepSeekMoE with sigmoid
``noaux_tc`` routing, one dense layer first) small enough that a forward pass takes milliseconds on
a laptop CPU. Its vocabulary (512) matches the bundled stories260K tokenizer, so a random debug
model can be paired with a real tokenizer end to end.
"""

from __future__ import annotations

from deepwhale.model.config import ConfigError, ModelConfig

FLAVOURS: dict[str, dict] = {
    # benchmark shapes: the 58M LLaMA PLATFORM.md measured llama.cpp on, and a DeepSeek-V3-shaped
    # model of the same width (134M parameters with its 16 experts)
    "bench-llama-58m": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "bench-v3-134m": dict(
        model_type="deepseek_v3",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=4096,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # the demo model trained from the shared zh/en corpora (examples/train/demo-v3.yaml): 5.8M
    # parameters with an 8192-token vocabulary (the trainer takes the vocabulary of the shards)
    "demo-v3": dict(
        model_type="deepseek_v3",
        vocab_size=8192,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=2048,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "debug-v3": dict(
        model_type="deepseek_v3",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32768,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "debug-v2": dict(
        model_type="deepseek_v2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=4096,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "debug-llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def flavour_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a named flavour, with optional field overrides.

    Raises:
        ConfigError: unknown flavour name (the message lists the known ones).
    """
    if name not in FLAVOURS:
        raise ConfigError(f"unknown flavour {name!r}; known: {', '.join(sorted(FLAVOURS))}")
    return ModelConfig(**{**FLAVOURS[name], **overrides})
