"""Model configuration for the DeepSeek family, read from and written to HF ``config.json``.

One :class:`ModelConfig` covers the five layouts deepwhale runs:

* ``llama``        DeepSeek LLM 7B/67B, DeepSeek-Coder 1.3B/6.7B/33B, DeepSeek-R1-Distill-Llama.
* ``qwen2``        DeepSeek-R1-Distill-Qwen 1.5B/7B/14B/32B (q/k/v projections carry a bias).
* ``deepseek_v2``  DeepSeek-V2, V2-Lite, Coder-V2: MLA attention + DeepSeekMoE.
* ``deepseek_v3``  DeepSeek-V3, R1, V3.1: MLA + DeepSeekMoE with sigmoid ``noaux_tc`` routing.
* ``deepseek_v32`` DeepSeek-V3.2: V3 plus DeepSeek Sparse Attention, a lightning indexer that keeps
  the ``index_topk`` best cached tokens per query (DeepSeek-V3.2 tech report §2.1).

Field names are the HF config keys, so ``from_hf(to_hf(c)) == c``. References: DeepSeek-V2 paper
(arXiv:2405.04434) §2.1 (MLA), §2.2 (DeepSeekMoE); DeepSeek-V3 paper (arXiv:2412.19437) §2.1.2
(auxiliary-loss-free balancing); DeepSeek-V3.2 tech report (arXiv:2512.02556) §2.1 (DeepSeek Sparse
Attention); YaRN (arXiv:2309.00071); Llama 3.1 RoPE scaling.

The module stays whole: one dataclass owns every family's keys, and its reader, writer and
validation (which reject an option of one family set on another) read the same field table, so
splitting it by family would scatter one table over several files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "deepseek_v2", "deepseek_v3", "deepseek_v32")
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SUPPORTED_SCORING = ("softmax", "sigmoid")
SUPPORTED_ACT = ("silu",)

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
}
#: DeepSeek-V3.2's defaults for the indexer keys (transformers' DeepseekV32Config, the release)
_INDEX_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
_MLP_LAYER_TYPES = ("dense", "sparse")


class ConfigError(ValueError):
    """A config.json that deepwhale cannot run: unknown model type, unsupported option or bad value."""


@dataclass
class ModelConfig:
    """Architecture hyper-parameters of one DeepSeek-family model (HF ``config.json`` keys).

    Derived values are filled in and everything is validated in ``__post_init__``; an invalid or
    unsupported value raises :class:`ConfigError` naming the key and what is supported.

    Attributes:
        model_type: one of ``llama``, ``qwen2``, ``deepseek_v2``, ``deepseek_v3``, ``deepseek_v32``.
        vocab_size: number of token ids (rows of the embedding), tokens.
        hidden_size: model width H.
        intermediate_size: width of the dense SwiGLU MLP.
        num_hidden_layers: number of decoder layers L.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA); MLA models ignore it.
        head_dim: per-head width for llama/qwen2 (default ``hidden_size // num_attention_heads``).
        max_position_embeddings: longest context the config declares, tokens.
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: RoPE scaling dict (``rope_type``/``type`` + its parameters) or None.
        rope_interleave: rotate adjacent pairs (DeepSeek's layout) instead of the two halves.
            Defaults to True for deepseek_v2/v3 (the reference implementation), False otherwise;
            deepseek_v32 always interleaves MLA's RoPE (its indexer always rotates halves).
        tie_word_embeddings: share ``lm_head.weight`` with ``model.embed_tokens.weight``.
        attention_bias: bias on q/k/v/o (llama) or on MLA's down projections (DeepSeek).
        qkv_bias: bias on q/k/v only (qwen2 always has it).
        mlp_bias: bias on the MLP projections (llama only).
        hidden_act: MLP activation; only ``silu`` (SwiGLU) is supported.
        q_lora_rank: rank of MLA's query compression, or None for a full ``q_proj`` (deepseek_v32
            needs it: the indexer's queries are projected from that compressed query).
        kv_lora_rank: rank of MLA's joint key/value compression (the cached latent width).
        qk_nope_head_dim: per-head query/key width without RoPE.
        qk_rope_head_dim: per-head query/key width with RoPE (the key part is shared by heads).
        v_head_dim: per-head value width.
        n_routed_experts: routed experts per MoE layer (None: dense model).
        n_shared_experts: always-active shared experts.
        num_experts_per_tok: routed experts chosen per token (top-k).
        moe_intermediate_size: width of one expert's SwiGLU MLP.
        first_k_dense_replace: the first k layers use a dense MLP.
        moe_layer_freq: after those, every ``moe_layer_freq``-th layer is MoE (1 for deepseek_v32).
        mlp_layer_types: deepseek_v32 only: ``"dense"`` or ``"sparse"`` (MoE) per layer; derived
            from ``first_k_dense_replace`` when absent, as transformers does.
        index_n_heads: deepseek_v32 lightning-indexer heads ``H_I`` (DeepSeek-V3.2 §2.1, eq. 1).
        index_head_dim: width of each indexer query head and of the one shared indexer key, the
            only extra per-token cache; its first ``qk_rope_head_dim`` dims carry RoPE.
        index_topk: tokens each query attends to, chosen by the indexer's scores (2048 in the
            release); a context up to that length attends densely.
        topk_method: ``greedy``, ``group_limited_greedy`` or ``noaux_tc``.
        scoring_func: ``softmax`` (V2) or ``sigmoid`` (V3).
        n_group, topk_group: group-limited routing: experts are split in ``n_group`` groups and
            only the best ``topk_group`` groups are searched.
        norm_topk_prob: renormalise the top-k weights to sum to one.
        routed_scaling_factor: multiplier on the routed experts' output.
        aux_loss_alpha, seq_aux: auxiliary balance loss weight and per-sequence flag (training).
        bos_token_id, eos_token_id, pad_token_id: special token ids (eos may be a list).
        torch_dtype: dtype the checkpoint was saved in (``bfloat16``...), informational.
        quantization_config: e.g. DeepSeek-V3's FP8 block-scaled format; read by the loader.
        num_nextn_predict_layers: V3 multi-token-prediction layers (their weights are skipped).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool | None = None
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # MLA (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # DeepSeekMoE (DeepSeek-V2 §2.2, DeepSeek-V3 §2.1.2)
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    mlp_layer_types: list[str] | None = None
    topk_method: str | None = None
    scoring_func: str | None = None
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1)
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    # tokens and storage
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = field(default=None, compare=False)
    quantization_config: dict[str, Any] | None = None
    num_nextn_predict_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; deepwhale supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act not in SUPPORTED_ACT:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(SUPPORTED_ACT)}"
            )
        self._check_types()
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _positive(key, getattr(self, key))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive("num_key_value_heads", self.num_key_value_heads)
        if not self.is_mla and self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

        if self.qkv_bias is None:
            self.qkv_bias = self.model_type == "qwen2" or (
                self.model_type == "llama" and self.attention_bias
            )
        if self.is_mla:
            self._validate_mla()
        if self.model_type == "deepseek_v32":
            self._validate_sparse_attention()
        else:
            for key in (*_INDEX_DEFAULTS, "mlp_layer_types"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"{key} is a deepseek_v32 key (DeepSeek Sparse Attention); "
                        f"model_type {self.model_type!r} does not use it"
                    )
        if not self.is_mla:
            if self.head_dim is None:
                if self.hidden_size % self.num_attention_heads:
                    raise ConfigError(
                        f"hidden_size ({self.hidden_size}) is not divisible by "
                        f"num_attention_heads ({self.num_attention_heads}); set head_dim"
                    )
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim % 2:
                raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_interleave is None:
            self.rope_interleave = self.is_mla
        self._validate_rope()
        if self.n_routed_experts:
            self._validate_moe()

    def _check_types(self) -> None:
        """Reject values of the wrong type or range before any arithmetic sees them (a string
        "false" must not count as true; NaN or a negative size must not reach the model)."""
        for key in ("intermediate_size", "max_position_embeddings"):
            _positive(key, getattr(self, key))
        for key in (
            "num_key_value_heads",
            "head_dim",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "n_group",
            "topk_group",
            *_INDEX_DEFAULTS,
        ):
            if getattr(self, key) is not None:
                _positive(key, getattr(self, key))
        for key in ("first_k_dense_replace", "num_nextn_predict_layers"):
            _non_negative(key, getattr(self, key))
        if self.n_shared_experts is not None:
            _non_negative("n_shared_experts", self.n_shared_experts)
        _positive("moe_layer_freq", self.moe_layer_freq)
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "seq_aux"):
            _boolean(key, getattr(self, key))
        for key in ("rope_interleave", "qkv_bias", "norm_topk_prob"):
            if getattr(self, key) is not None:
                _boolean(key, getattr(self, key))
        for key in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            _finite_positive(key, getattr(self, key))
        _finite(key="aux_loss_alpha", value=self.aux_loss_alpha)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if self.quantization_config is not None:
            if not isinstance(self.quantization_config, dict):
                raise ConfigError(
                    f"quantization_config must be an object, got {self.quantization_config!r}"
                )
            block = self.quantization_config.get("weight_block_size", [128, 128])
            if not (isinstance(block, list | tuple) and len(block) == 2):
                raise ConfigError(
                    f"quantization_config.weight_block_size must be [rows, cols], got {block!r}"
                )
            for b in block:
                _positive("quantization_config.weight_block_size", b)

    @property
    def is_mla(self) -> bool:
        """True for deepseek_v2/v3/v32 (multi-head latent attention)."""
        return self.model_type in MLA_MODEL_TYPES

    @property
    def is_sparse_attention(self) -> bool:
        """True for deepseek_v32: MLA reads only the tokens its lightning indexer selects."""
        return self.model_type == "deepseek_v32"

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: ``qk_nope_head_dim + qk_rope_head_dim`` for MLA, else head_dim."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def rope_dim(self) -> int:
        """Number of dimensions RoPE rotates per head (``qk_rope_head_dim`` for MLA)."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_type(self) -> str:
        """``default``, ``linear``, ``llama3`` or ``yarn``."""
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` uses DeepSeekMoE: ``mlp_layer_types`` where set
        (deepseek_v32), else the DeepSeek-V2 reference rule."""
        if self.mlp_layer_types is not None:
            return bool(self.n_routed_experts) and self.mlp_layer_types[layer_idx] == "sparse"
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def _validate_mla(self) -> None:
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(key, getattr(self, key))
        if self.q_lora_rank is not None:
            _positive("q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        self.head_dim = self.qk_rope_head_dim

    def _validate_sparse_attention(self) -> None:
        """deepseek_v32: the indexer's keys, the MLP layer pattern, and the options transformers'
        port (the reference we test against) fixes; anything else fails naming the key."""
        for key, default in _INDEX_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.q_lora_rank is None:
            raise ConfigError(
                "deepseek_v32 needs q_lora_rank: the lightning indexer projects its queries from "
                "MLA's compressed query (DeepSeek-V3.2 §2.1); q_lora_rank=null is not supported"
            )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                f"({self.qk_rope_head_dim}): the indexer rotates its first qk_rope_head_dim dims"
            )
        if self.rope_interleave is False:
            raise ConfigError(
                "rope_interleave=false is not supported for deepseek_v32 (its MLA always rotates "
                "interleaved pairs, its indexer the two halves)"
            )
        if self.moe_layer_freq != 1:
            raise ConfigError(
                f"moe_layer_freq={self.moe_layer_freq} is not supported for deepseek_v32; set "
                "mlp_layer_types instead"
            )
        if self.mlp_layer_types is None:
            dense = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * dense + ["sparse"] * (self.num_hidden_layers - dense)
        types = self.mlp_layer_types
        if not isinstance(types, list) or len(types) != self.num_hidden_layers:
            raise ConfigError(
                f"mlp_layer_types must list one entry per layer ({self.num_hidden_layers}), "
                f"got {types!r}"
            )
        bad = sorted({t for t in types if t not in _MLP_LAYER_TYPES}, key=str)
        if bad:
            raise ConfigError(
                f"unsupported mlp_layer_types {bad!r}; supported: {', '.join(_MLP_LAYER_TYPES)}"
            )
        if "sparse" in types and not self.n_routed_experts:
            raise ConfigError("mlp_layer_types has 'sparse' layers but n_routed_experts is not set")
        layer_types = self.extra.get("layer_types")
        if layer_types is not None and (
            not isinstance(layer_types, list) or set(layer_types) - {"indexed_attention"}
        ):
            raise ConfigError(
                f"unsupported layer_types {layer_types!r} for deepseek_v32; every layer must be "
                "'indexed_attention'"
            )
        for key, only in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
            if getattr(self, key) not in (None, only):
                raise ConfigError(
                    f"unsupported {key} {getattr(self, key)!r} for deepseek_v32; supported: {only}"
                )

    def _validate_moe(self) -> None:
        if self.model_type not in MLA_MODEL_TYPES:
            raise ConfigError(
                f"n_routed_experts is set but model_type {self.model_type!r} has no MoE; "
                f"DeepSeekMoE runs with {', '.join(MLA_MODEL_TYPES)}"
            )
        for key in ("num_experts_per_tok", "moe_intermediate_size"):
            _positive(key, getattr(self, key))
        _positive("moe_layer_freq", self.moe_layer_freq)
        if self.n_shared_experts is None:
            self.n_shared_experts = 0
        v3 = self.model_type in ("deepseek_v3", "deepseek_v32")
        if self.topk_method is None:
            self.topk_method = "noaux_tc" if v3 else "greedy"
        if self.scoring_func is None:
            self.scoring_func = "sigmoid" if v3 else "softmax"
        if self.norm_topk_prob is None:
            self.norm_topk_prob = v3
        if self.topk_method not in SUPPORTED_TOPK_METHODS:
            raise ConfigError(
                f"unsupported topk_method {self.topk_method!r}; supported: "
                f"{', '.join(SUPPORTED_TOPK_METHODS)}"
            )
        if self.scoring_func not in SUPPORTED_SCORING:
            raise ConfigError(
                f"unsupported scoring_func {self.scoring_func!r}; supported: "
                f"{', '.join(SUPPORTED_SCORING)}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if not self.n_group or not self.topk_group:
                raise ConfigError(f"topk_method {self.topk_method!r} needs n_group and topk_group")
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by "
                    f"n_group ({self.n_group})"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group ({self.topk_group}) must be in 1..n_group")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ConfigError(
                    "noaux_tc scores a group by its top-2 experts: need >= 2 per group"
                )
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ConfigError(
                    f"topk_group ({self.topk_group}) groups of {per_group} experts cannot hold "
                    f"num_experts_per_tok ({self.num_experts_per_tok}) experts"
                )

    def _validate_rope(self) -> None:
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_scaling type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if rope_type == "default":
            return
        rs = self.rope_scaling
        factor = rs.get("factor")
        if not _is_number(factor) or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(
                f"rope_scaling {rope_type!r} needs a positive 'factor', got {factor!r}"
            )
        for key in ("original_max_position_embeddings",):
            if rs.get(key) is not None:
                _positive(f"rope_scaling.{key}", rs[key])
        for key in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            if rs.get(key) is not None:
                _finite_positive(f"rope_scaling.{key}", rs[key])
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if rs.get(key) is not None:
                _finite(f"rope_scaling.{key}", rs[key])
                if rs[key] < 0:
                    raise ConfigError(f"rope_scaling.{key} must be >= 0, got {rs[key]!r}")
        if rs.get("truncate") is not None:
            _boolean("rope_scaling.truncate", rs["truncate"])
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"rope_scaling 'llama3' needs {key!r}")
            if self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                raise ConfigError("rope_scaling 'llama3' needs high_freq_factor > low_freq_factor")

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build a config from a parsed HF ``config.json`` dict.

        Reads both the Hub spelling (``rope_theta`` + ``rope_scaling``) and transformers 5.x's
        ``rope_parameters``. Keys deepwhale does not model are kept in ``extra`` (and written back
        by :meth:`to_hf`).

        Raises:
            ConfigError: unknown ``model_type``, an unsupported option (sliding-window attention,
                an activation other than SiLU, an unknown RoPE type...) or an invalid value.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"config must be a JSON object, got {type(hf).__name__}")
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError(
                f"config has no 'model_type'; deepwhale supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise ConfigError(
                "use_sliding_window=true is not supported (no DeepSeek model uses it); "
                "set it to false"
            )
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp > 1 is not supported; re-save with pretraining_tp=1")
        if hf.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise ConfigError("partial_rotary_factor != 1 is not supported")

        rope_scaling = hf.pop("rope_scaling", None)
        rope_params = hf.pop("rope_parameters", None)
        for key, value in (("rope_scaling", rope_scaling), ("rope_parameters", rope_params)):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key} must be an object or null, got {value!r}")
        if rope_params:
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params:
                hf.setdefault("rope_theta", rope_params.pop("rope_theta"))
            rope_params.pop("partial_rotary_factor", None)
            if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
                rope_scaling = rope_scaling or rope_params
        if rope_scaling:
            rope_scaling = dict(rope_scaling)
            if "rope_type" not in rope_scaling and "type" in rope_scaling:
                rope_scaling["rope_type"] = rope_scaling.pop("type")
            if rope_scaling.get("rope_type") == "default":
                rope_scaling = None
        hf["rope_scaling"] = rope_scaling
        if model_type == "qwen2":
            hf.setdefault("qkv_bias", True)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in hf.items() if k in names}
        extra = {k: v for k, v in hf.items() if k not in names}
        if model_type in MLA_MODEL_TYPES and not hf.get("n_routed_experts"):
            known["n_routed_experts"] = None
        try:
            cfg = cls(**known, extra=extra)
        except TypeError as e:  # wrong value types reach arithmetic in validation
            raise ConfigError(f"invalid config value: {e}") from e
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (Hub spelling: ``rope_theta`` + ``rope_scaling``).

        transformers reads it back into the matching ``*ForCausalLM`` class.
        """
        out: dict[str, Any] = dict(self.extra)
        out["architectures"] = [_ARCHITECTURES[self.model_type]]
        for f in dataclasses.fields(self):
            if f.name in ("extra", "qkv_bias"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("rope_scaling", "q_lora_rank"):
                continue
            out[f.name] = value
        if not self.is_mla:
            for key in list(out):
                if key in _MLA_MOE_KEYS:
                    out.pop(key)
            out.pop("rope_interleave", None)
        if self.model_type == "llama" and self.qkv_bias != self.attention_bias:
            raise ConfigError("llama has one attention_bias flag for q/k/v/o; qkv_bias must match")
        if self.model_type in ("deepseek_v2", "deepseek_v32"):
            out.pop("rope_interleave", None)  # V2 and V3.2 always rotate interleaved pairs
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json``; malformed JSON raises :class:`ConfigError` naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json found") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed JSON: {e}") from e
        try:
            return cls.from_hf(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


_MLA_MOE_KEYS = {
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "moe_layer_freq",
    "topk_method",
    "scoring_func",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "aux_loss_alpha",
    "seq_aux",
    "num_nextn_predict_layers",
    "mlp_layer_types",
    *_INDEX_DEFAULTS,
}


def _positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _non_negative(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(key: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _finite_positive(key: str, value: Any) -> None:
    _finite(key, value)
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")
