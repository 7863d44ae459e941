"""ModelConfig: reading real config shapes, derived values, and precise errors."""

from __future__ import annotations

import json

import pytest

from deepwhale.model.config import ConfigError, ModelConfig
from deepwhale.model.flavours import FLAVOURS, flavour_config
from deepwhale.model.transformer import num_parameters

# Shapes of released configs (the keys that matter), as published on the Hub.
V3_HUB = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
V2_LITE_HUB = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
}
QWEN_DISTILL = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rope_theta": 10000,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 21,
    "hidden_act": "silu",
}
CODER_67 = {
    "model_type": "llama",
    "vocab_size": 32256,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 16384,
    "rope_theta": 100000,
    "rope_scaling": {"factor": 4.0, "type": "linear"},
    "rms_norm_eps": 1e-06,
}


def test_v3_hub_config():
    c = ModelConfig.from_hf(V3_HUB)
    assert c.is_mla and c.rope_type == "yarn" and c.rope_interleave
    assert c.qk_head_dim == 192 and c.rope_dim == 64
    assert [c.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert c.quantization_config["weight_block_size"] == [128, 128]
    assert c.extra == {}
    again = ModelConfig.from_hf(json.loads(json.dumps(c.to_hf())))
    assert again == c


def test_v2_lite_defaults_and_moe_layer_freq():
    c = ModelConfig.from_hf(V2_LITE_HUB)
    assert c.topk_method == "greedy" and c.scoring_func == "softmax" and not c.norm_topk_prob
    assert c.q_lora_rank is None
    c2 = ModelConfig.from_hf({**V2_LITE_HUB, "moe_layer_freq": 2, "first_k_dense_replace": 1})
    assert [c2.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


def test_qwen_and_llama_configs():
    q = ModelConfig.from_hf(QWEN_DISTILL)
    assert q.qkv_bias and q.head_dim == 128 and q.num_key_value_heads == 2
    assert q.extra["sliding_window"] == 4096  # unknown keys survive a round trip
    assert ModelConfig.from_hf(q.to_hf()) == q
    c = ModelConfig.from_hf(CODER_67)
    assert c.rope_type == "linear" and not c.qkv_bias


def test_transformers5_rope_parameters_spelling():
    hf = dict(CODER_67)
    hf.pop("rope_theta")
    hf.pop("rope_scaling")
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}
    c = ModelConfig.from_hf(hf)
    assert c.rope_theta == 100000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5.0}
    assert ModelConfig.from_hf(hf).rope_scaling is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "mixtral"}, "unsupported model_type 'mixtral'; deepwhale supports llama"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope_scaling type"),
        ({"rope_scaling": {"type": "linear"}}, "needs a positive 'factor'"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
        ({"hidden_size": "4096"}, "hidden_size must be a positive integer"),
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"n_routed_experts": 8}, "has no MoE"),
        ({"intermediate_size": -1}, "intermediate_size must be a positive integer"),
        ({"intermediate_size": 172.0}, "intermediate_size must be a positive integer"),
        ({"head_dim": 0}, "head_dim must be a positive integer"),
        ({"max_position_embeddings": "512"}, "max_position_embeddings must be a positive"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"rope_interleave": "false"}, "rope_interleave must be true or false"),
        ({"attention_bias": 0}, "attention_bias must be true or false"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be an object or null"),
        ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null"),
        (
            {
                "rope_scaling": {
                    "type": "yarn",
                    "factor": 4,
                    "original_max_position_embeddings": "256",
                }
            },
            "original_max_position_embeddings must be a positive integer",
        ),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": "32"}},
            "beta_fast must be a finite number",
        ),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "mscale": -1}}, "mscale must be >= 0"),
        ({"quantization_config": "fp8"}, "quantization_config must be an object"),
    ],
)
def test_bad_llama_configs(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf({**CODER_67, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topk_method": "expert_choice"}, "unsupported topk_method 'expert_choice'"),
        ({"scoring_func": "relu"}, "unsupported scoring_func 'relu'"),
        ({"n_group": 7}, "must be divisible by n_group"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 300}, "exceeds n_routed_experts"),
        ({"kv_lora_rank": None}, "kv_lora_rank must be a positive integer"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim must be even"),
        ({"n_group": None}, "needs n_group and topk_group"),
        ({"first_k_dense_replace": "1"}, "first_k_dense_replace must be a non-negative integer"),
        ({"n_shared_experts": -1}, "n_shared_experts must be a non-negative integer"),
        ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor must be a finite number"),
        ({"routed_scaling_factor": -2.5}, "routed_scaling_factor must be > 0"),
        ({"norm_topk_prob": "false"}, "norm_topk_prob must be true or false"),
        ({"quantization_config": {"weight_block_size": [128]}}, "weight_block_size must be"),
    ],
)
def test_bad_moe_configs(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**V3_HUB, **change})


def test_missing_model_type_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="no 'model_type'"):
        ModelConfig.from_hf({"hidden_size": 4})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_hf([1, 2])
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        ModelConfig.from_json_file(bad)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json_file(tmp_path / "nope" / "config.json")


def test_flavours_build():
    for name in FLAVOURS:
        c = flavour_config(name)
        assert num_parameters(c) > 0
    assert num_parameters(flavour_config("debug-v3")) < 2_000_000
    with pytest.raises(ConfigError, match="unknown flavour"):
        flavour_config("huge")
