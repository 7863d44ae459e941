"""Parallel layout planner: an analytic model of memory, communication and speed per layout.

Pure Python (``math`` and dataclasses; no torch). Given a :class:`~deepwhale.model.config.ModelConfig`
and a cluster, :func:`plan` enumerates every :class:`~deepwhale.parallel.layout.ParallelLayout`
(``dp``, ``dp_shard``, ``tp``, ``pp``, ``ep``, pipeline schedule, microbatch size, activation
checkpointing) that passes :func:`~deepwhale.parallel.layout.check_layout`, estimates each one with
:func:`estimate` and ranks those that fit in memory by predicted tokens/s per GPU.

Sources (every formula is written out in ``docs/planner.md``):

* Megatron-LM tensor parallelism, Shoeybi et al. 2019 (arXiv:1909.08053): two all-reduces per
  transformer layer in the forward pass and two in the backward pass.
* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters"
  (arXiv:2104.04473) §2.2: pipeline bubble ``(p-1)/m`` of the ideal time for GPipe/1F1B and
  ``(p-1)/(v m)`` for the interleaved schedule; 1F1B keeps at most ``p`` microbatches in flight.
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (arXiv:2205.05198): activation bytes per layer ``s b h (34 + 5 a s / h)``, divided by ``t`` with
  sequence parallelism; ``2 s b h`` per layer under full recomputation.
* DeepSeek-V3 technical report (arXiv:2412.19437) §3.2: expert parallelism with all-to-all
  dispatch and combine of ``tokens x top-k`` hidden vectors.
* PaLM (Chowdhery et al. 2022, arXiv:2204.02311) appendix B: model FLOPs ``6 N + 12 L H Q T``
  per token, the numerator of MFU.

Units: bytes, tokens, seconds, FLOPs; bandwidths in Gb/s (10^9 bits per second) per GPU.

This module stays whole (about 1,500 lines): :func:`estimate` is one analytic model whose
memory, communication and time terms share the per-layer statistics, and ``docs/planner.md``
follows it formula by formula; splitting the terms apart would scatter that one derivation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from deepwhale.model.config import ConfigError, ModelConfig
from deepwhale.parallel.layout import LayoutError, ParallelLayout, check_layout, describe

GB = 10**9
GIB = 2**30

#: Public shapes of released DeepSeek models, keyed by the name ``deepwhale plan --model`` takes.
#: Each is the architecture part of the model's Hub ``config.json`` (the URL in ``source``).
KNOWN_MODELS: dict[str, dict] = {
    "deepseek-v3-671b": dict(
        source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json",
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        routed_scaling_factor=2.5,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=3,
        moe_layer_freq=1,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "deepseek-v2-236b": dict(
        source="https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json",
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=2,
        n_routed_experts=160,
        num_experts_per_tok=6,
        routed_scaling_factor=16.0,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        topk_method="group_limited_greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        n_group=8,
        topk_group=3,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-llm-7b": dict(
        source="https://huggingface.co/deepseek-ai/deepseek-llm-7b-base/blob/main/config.json",
        model_type="llama",
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=30,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-llm-67b": dict(
        source="https://huggingface.co/deepseek-ai/deepseek-llm-67b-base/blob/main/config.json",
        model_type="llama",
        vocab_size=102400,
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=95,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
}


class PlanError(ValueError):
    """Bad planner input (an unknown model, a size that does not parse, a cluster that cannot be
    split) or no layout that fits in memory. The message names the input and what would work."""


def known_model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a public DeepSeek release in :data:`KNOWN_MODELS`.

    Raises:
        PlanError: ``name`` is not a known release (the message lists them).
    """
    if name not in KNOWN_MODELS:
        raise PlanError(f"unknown model {name!r}; known releases: {', '.join(KNOWN_MODELS)}")
    fields = {k: v for k, v in KNOWN_MODELS[name].items() if k != "source"}
    return ModelConfig(**fields)


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamGroup:
    """One weight of the deepwhale model (or ``count`` identical ones: the routed experts).

    Attributes:
        name: the parameter's name inside a decoder layer (``self_attn.q_b_proj.weight``;
            ``{j}`` stands for the expert index) or at the top level (``lm_head.weight``).
        shape: full (unsharded) shape, elements.
        tp_dim: dimension tensor parallelism splits (0: column-parallel rows / vocabulary
            rows, 1: row-parallel columns) or None when every TP rank holds all of it.
        expert: a routed expert's weight (split by ``ep`` instead of ``tp``).
        count: how many identical weights this group stands for (``n_routed_experts``).
        matmul: the weight enters a matrix product (2 FLOPs per element per token forward);
            False for norms, biases and the embedding lookup.
    """

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None = None
    expert: bool = False
    count: int = 1
    matmul: bool = True

    @property
    def numel(self) -> int:
        """Elements of all ``count`` weights."""
        return math.prod(self.shape) * self.count


def _linear(name: str, out: int, inp: int, tp_dim: int | None, bias: bool) -> list[ParamGroup]:
    groups = [ParamGroup(f"{name}.weight", (out, inp), tp_dim)]
    if bias:  # a row-parallel layer's bias is added after the reduction: replicated
        groups.append(ParamGroup(f"{name}.bias", (out,), 0 if tp_dim == 0 else None, matmul=False))
    return groups


def _mlp(prefix: str, h: int, inter: int, bias: bool, tp: bool = True) -> list[ParamGroup]:
    col, row = (0, 1) if tp else (None, None)
    return [
        *_linear(f"{prefix}.gate_proj", inter, h, col, bias),
        *_linear(f"{prefix}.up_proj", inter, h, col, bias),
        *_linear(f"{prefix}.down_proj", h, inter, row, bias),
    ]


def _attention_groups(c: ModelConfig) -> list[ParamGroup]:
    h, nh = c.hidden_size, c.num_attention_heads
    if not c.is_mla:
        d, nkv = c.head_dim, c.num_key_value_heads
        return [
            *_linear("self_attn.q_proj", nh * d, h, 0, c.qkv_bias),
            *_linear("self_attn.k_proj", nkv * d, h, 0, c.qkv_bias),
            *_linear("self_attn.v_proj", nkv * d, h, 0, c.qkv_bias),
            *_linear("self_attn.o_proj", h, nh * d, 1, c.attention_bias),
        ]
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    groups: list[ParamGroup] = []
    if c.q_lora_rank is None:
        groups += _linear("self_attn.q_proj", nh * qk, h, 0, False)
    else:  # the down projections are small and replicated over TP ranks
        groups += _linear("self_attn.q_a_proj", c.q_lora_rank, h, None, c.attention_bias)
        groups.append(ParamGroup("self_attn.q_a_layernorm.weight", (c.q_lora_rank,), matmul=False))
        groups += _linear("self_attn.q_b_proj", nh * qk, c.q_lora_rank, 0, False)
    kv = c.kv_lora_rank + c.qk_rope_head_dim
    groups += _linear("self_attn.kv_a_proj_with_mqa", kv, h, None, c.attention_bias)
    groups.append(ParamGroup("self_attn.kv_a_layernorm.weight", (c.kv_lora_rank,), matmul=False))
    groups += _linear(
        "self_attn.kv_b_proj", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, 0, False
    )
    groups += _linear("self_attn.o_proj", h, nh * c.v_head_dim, 1, c.attention_bias)
    if c.is_sparse_attention:  # DeepSeek-V3.2's lightning indexer: small, replicated over TP
        ni, di = c.index_n_heads, c.index_head_dim
        groups += _linear("self_attn.indexer.wq_b", ni * di, c.q_lora_rank, None, False)
        groups += _linear("self_attn.indexer.wk", di, h, None, False)
        groups.append(ParamGroup("self_attn.indexer.k_norm.weight", (di,), matmul=False))
        groups.append(ParamGroup("self_attn.indexer.k_norm.bias", (di,), matmul=False))
        groups += _linear("self_attn.indexer.weights_proj", ni, h, None, False)
    return groups


def layer_param_groups(config: ModelConfig, moe: bool) -> list[ParamGroup]:
    """The weights of one decoder layer, dense (``moe=False``) or DeepSeekMoE (``moe=True``).

    Mirrors :class:`deepwhale.model.transformer.DecoderLayer`: attention (MLA or GQA), the MLP
    (SwiGLU, or the MoE gate ``(E, H)`` + ``E`` routed experts + one shared MLP of width
    ``n_shared_experts * moe_intermediate_size``) and the two RMSNorm weights. The router's
    ``e_score_correction_bias`` is a buffer, not a parameter, and is not counted.
    """
    c = config
    h = c.hidden_size
    groups = _attention_groups(c)
    if moe:
        e, mi = c.n_routed_experts, c.moe_intermediate_size
        groups.append(ParamGroup("mlp.gate.weight", (e, h)))
        for g in _mlp("mlp.experts.{j}", h, mi, False, tp=False):
            groups.append(dataclasses.replace(g, expert=True, count=e))
        if c.n_shared_experts:
            groups += _mlp("mlp.shared_experts", h, mi * c.n_shared_experts, False)
    else:
        groups += _mlp("mlp", h, c.intermediate_size, c.mlp_bias)
    groups.append(ParamGroup("input_layernorm.weight", (h,), matmul=False))
    groups.append(ParamGroup("post_attention_layernorm.weight", (h,), matmul=False))
    return groups


def root_param_groups(config: ModelConfig) -> tuple[list[ParamGroup], list[ParamGroup]]:
    """The weights outside the decoder layers: ``(first stage, last stage)``.

    First: ``model.embed_tokens.weight`` ``(V, H)`` (vocabulary-parallel under TP). Last:
    ``model.norm.weight`` ``(H,)`` and, unless ``tie_word_embeddings``, ``lm_head.weight``
    ``(V, H)`` (column-parallel: loss parallel).
    """
    c = config
    first = [ParamGroup("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), 0, False)]
    last = [ParamGroup("model.norm.weight", (c.hidden_size,), matmul=False)]
    if not c.tie_word_embeddings:
        last.append(ParamGroup("lm_head.weight", (c.vocab_size, c.hidden_size), 0))
    return first, last


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``CausalLM(config)``: ``{name: shape}`` with the names of
    ``named_parameters()`` (tied ``lm_head.weight`` appears once, as the embedding)."""
    first, last = root_param_groups(config)
    out = {g.name: g.shape for g in first}
    for i in range(config.num_hidden_layers):
        for g in layer_param_groups(config, config.is_moe_layer(i)):
            names = [g.name.format(j=j) for j in range(g.count)] if g.expert else [g.name]
            for name in names:
                out[f"model.layers.{i}.{name}"] = g.shape
    out.update({g.name: g.shape for g in last})
    return out


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, elements.

    Attributes:
        total: every parameter (``sum(p.numel() for p in CausalLM(c).parameters())``).
        embedding: ``model.embed_tokens`` (``V x H``).
        lm_head: the output head (0 when tied to the embedding).
        attention: all layers' attention projections and MLA's latent norms.
        dense_mlp: the dense SwiGLU MLPs.
        router: the MoE gates (``E x H`` per MoE layer).
        routed_experts: all routed experts.
        shared_experts: all shared experts.
        norms: the per-layer RMSNorms and the final norm.
        active: parameters one token uses: ``total`` minus the routed experts it is not sent to
            (``(E - k) / E`` of them), embedding included (DeepSeek's "activated parameters").
        active_matmul: ``active`` without the embedding lookup and the norms: the ``N`` of
            ``6 N`` FLOPs per token.
    """

    total: int
    embedding: int
    lm_head: int
    attention: int
    dense_mlp: int
    router: int
    routed_experts: int
    shared_experts: int
    norms: int
    active: int
    active_matmul: int


def param_counts(config: ModelConfig) -> ParamCounts:
    """Exact parameter counts of ``deepwhale.model.transformer.CausalLM(config)``.

    Multi-token-prediction layers (``num_nextn_predict_layers``) are not part of the deepwhale
    model and are not counted (DeepSeek-V3's 671B also excludes its 14B MTP module).
    """
    c = config
    first, last = root_param_groups(c)
    parts = dict(attention=0, dense_mlp=0, router=0, routed_experts=0, shared_experts=0, norms=0)
    active_matmul = 0
    k_over_e = (c.num_experts_per_tok / c.n_routed_experts) if c.n_routed_experts else 0.0
    for i in range(c.num_hidden_layers):
        for g in layer_param_groups(c, c.is_moe_layer(i)):
            if g.name.startswith("self_attn."):
                parts["attention"] += g.numel
            elif g.name.endswith("layernorm.weight"):
                parts["norms"] += g.numel
            elif g.name == "mlp.gate.weight":
                parts["router"] += g.numel
            elif g.expert:
                parts["routed_experts"] += g.numel
            elif g.name.startswith("mlp.shared_experts."):
                parts["shared_experts"] += g.numel
            else:
                parts["dense_mlp"] += g.numel
            if g.matmul:
                active_matmul += round(g.numel * k_over_e) if g.expert else g.numel
    embedding = first[0].numel
    lm_head = sum(g.numel for g in last if g.name == "lm_head.weight")
    parts["norms"] += c.hidden_size
    total = embedding + lm_head + sum(parts.values())
    routed_active = round(parts["routed_experts"] * k_over_e)
    active = total - parts["routed_experts"] + routed_active
    # a tied head still multiplies: its FLOPs count once, through the embedding matrix
    active_matmul += lm_head or (c.vocab_size * c.hidden_size)
    return ParamCounts(
        total, embedding, lm_head, **parts, active=active, active_matmul=active_matmul
    )


# ------------------------------------------------------------------------------------ outputs
@dataclass
class Collective:
    """One kind of collective a rank runs in a step, summed over its calls.

    Attributes:
        dim: mesh dimension: ``dp`` (replicate all-reduce), ``dp_shard`` (FSDP all-gather and
            reduce-scatter), ``tp``, ``pp`` (point-to-point sends) or ``ep`` (all-to-all).
        op: ``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all`` or ``send``.
        what: which tensors (``grads``, ``params fwd``, ``activations``...).
        group_size: ranks in the process group, n.
        calls: calls per optimizer step.
        payload_bytes: bytes of the input tensors this rank passes to the collectives (what a
            wrapper around ``torch.distributed`` records as ``input.numel() *
            input.element_size()``), summed over the calls.
        output_bytes: bytes of the output tensors (``n x`` payload for all-gather, ``1/n`` for
            reduce-scatter, equal otherwise).
        wire_bytes: bytes this rank sends over links with the bandwidth-optimal algorithms:
            ring all-reduce ``2 (n-1)/n x size``, all-gather and reduce-scatter ``(n-1)/n x``
            the full (unsharded) size, all-to-all ``(n-1)/n x`` payload (uniform routing),
            send = payload.
        intra_node: every rank of the group is in one node (uses the intra-node bandwidth).
    """

    dim: str
    op: str
    what: str
    group_size: int
    calls: int
    payload_bytes: int
    output_bytes: int
    wire_bytes: float
    intra_node: bool = True


@dataclass
class Memory:
    """Memory of one device, bytes.

    Attributes:
        params: parameters this rank holds (its TP/EP share, FSDP-sharded with padding).
        grads: gradients of them (unsharded local gradients when FSDP does not reduce-scatter
            every microbatch).
        optimizer: AdamW state (``optim_bytes_per_param`` per parameter: fp32 master + m + v =
            12 for bf16 training, m + v = 8 for fp32).
        fsdp_buffers: FSDP2 all-gathered parameters (two layers: the current one and the
            prefetched one, plus the root module, which FSDP2 keeps unsharded between forward
            and backward) and one layer's unsharded gradients before its reduce-scatter.
        activations: saved activations at the peak of the schedule, with the chosen activation
            checkpointing.
        activations_no_ac: the same without activation checkpointing.
        activations_full_ac: the same with full (per decoder layer) checkpointing.
    """

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    fsdp_buffers: int = 0
    activations: int = 0
    activations_no_ac: int = 0
    activations_full_ac: int = 0

    @property
    def total(self) -> int:
        """``params + grads + optimizer + fsdp_buffers + activations``, bytes."""
        return self.params + self.grads + self.optimizer + self.fsdp_buffers + self.activations


@dataclass
class Hardware:
    """The cluster :func:`estimate` predicts time for.

    Attributes:
        gpu_tflops: peak dense matrix TFLOP/s of one GPU in the training dtype (H100/H800 SXM
            bf16: 989).
        compute_efficiency: the share of that peak matrix products reach (0..1].
        gpus_per_node: GPUs that share the intra-node fabric (NVLink).
        intra_node_gbps: one GPU's one-direction bandwidth inside a node, Gb/s.
        inter_node_gbps: one GPU's one-direction bandwidth to other nodes (its NIC), Gb/s.
    """

    gpu_tflops: float = 989.0
    compute_efficiency: float = 0.5
    gpus_per_node: int = 8
    intra_node_gbps: float = 3600.0
    inter_node_gbps: float = 400.0

    def __post_init__(self) -> None:
        if not self.gpu_tflops > 0:
            raise PlanError(f"gpu_tflops must be > 0, got {self.gpu_tflops}")
        if not 0 < self.compute_efficiency <= 1:
            raise PlanError(f"compute_efficiency must be in (0, 1], got {self.compute_efficiency}")
        if self.gpus_per_node < 1:
            raise PlanError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not (self.intra_node_gbps > 0 and self.inter_node_gbps > 0):
            raise PlanError("bandwidths must be > 0 Gb/s")


@dataclass
class Estimate:
    """Memory, communication, FLOPs and (with a :class:`Hardware`) time of one layout.

    Attributes:
        layout: the resolved layout.
        micro_batch_size: sequences per microbatch, b.
        seq_len: tokens per sequence, s.
        microbatches: microbatches per optimizer step per data-parallel rank, m (pipeline
            microbatches under ``pp``, gradient accumulation steps otherwise).
        activation_checkpointing: ``none`` or ``full``.
        global_batch_tokens: tokens per optimizer step, ``dp * dp_shard * m * b * s``.
        params: parameter counts of the model.
        memory: the device with the largest total (the heaviest pipeline rank).
        memory_by_stage: one :class:`Memory` per pipeline rank (index = pp rank).
        comm: collectives of the pipeline rank that communicates most in each mesh dimension.
        bubble_fraction: idle share of a pipelined step, ``(p-1)/v / (m + (p-1)/v)``
            (``v = 2`` for interleaved 1F1B, 1 otherwise); 0 without ``pp``.
        model_flops: FLOPs of the step by the PaLM convention (``6 N_active + 6 L s n_h
            (d_qk + d_v)`` per token, no recomputation, causal mask not discounted), the MFU
            numerator.
        executed_flops_per_gpu: FLOPs the busiest GPU runs per step (causal attention halved,
            recomputation included, TP-replicated work not divided).
        compute_s: compute time of the busiest pipeline rank, seconds (None without hardware).
        step_s: predicted step time, seconds (None without hardware).
        comm_s: exposed (not overlapped) communication seconds per mesh dimension.
        tokens_per_s_per_gpu: ``global_batch_tokens / step_s / world``.
        mfu: ``model_flops / (world x peak x step_s)``.
    """

    layout: ParallelLayout
    micro_batch_size: int
    seq_len: int
    microbatches: int
    activation_checkpointing: str
    global_batch_tokens: int
    params: ParamCounts
    memory: Memory
    memory_by_stage: list[Memory]
    comm: list[Collective]
    bubble_fraction: float
    model_flops: float
    executed_flops_per_gpu: float
    compute_s: float | None = None
    step_s: float | None = None
    comm_s: dict[str, float] = field(default_factory=dict)
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None

    def comm_bytes(self, dim: str, kind: str = "payload") -> float:
        """Bytes per step in mesh dimension ``dim``: ``kind`` = ``payload`` (input tensors),
        ``output`` or ``wire`` (see :class:`Collective`)."""
        attr = {"payload": "payload_bytes", "output": "output_bytes", "wire": "wire_bytes"}[kind]
        return sum(getattr(c, attr) for c in self.comm if c.dim == dim)


# ------------------------------------------------------------------------------ the estimator
def bubble_fraction(pp: int, microbatches: int, schedule: str = "1f1b") -> float:
    """Idle share of a pipelined step (Narayanan et al. 2021 §2.2).

    GPipe and 1F1B idle ``(p-1)`` microbatch slots out of ``m + p - 1``: ``(p-1)/(m+p-1)``
    (Narayanan's "bubble time fraction" ``(p-1)/m`` is the same bubble relative to the ideal time).
    Interleaved 1F1B with ``v = 2`` model chunks per rank shrinks the bubble ``v`` times:
    ``((p-1)/v) / (m + (p-1)/v)``.

    Raises:
        PlanError: ``pp`` or ``microbatches`` below 1, or an unknown schedule.
    """
    if pp < 1 or microbatches < 1:
        raise PlanError(f"pp and microbatches must be >= 1, got {pp} and {microbatches}")
    v = _chunks(schedule)
    idle = (pp - 1) / v
    return idle / (microbatches + idle)


def _chunks(schedule: str) -> int:
    if schedule not in ("gpipe", "1f1b", "interleaved_1f1b"):
        raise PlanError(f"unknown pipeline schedule {schedule!r}")
    return 2 if schedule == "interleaved_1f1b" else 1


def in_flight_microbatches(schedule: str, pp: int, rank: int, microbatches: int) -> float:
    """Microbatches whose activations pipeline rank ``rank`` holds at its peak, in units of the
    rank's whole share of layers.

    GPipe runs all ``m`` forwards first: ``m``. 1F1B (PipeDream-Flush, Narayanan et al. 2021
    §2.2.1) warms up with ``p - rank`` forwards: ``min(m, p - rank)``. Interleaved 1F1B with
    ``v = 2`` chunks warms up with ``(v-1) p + 2 (p - 1 - rank) + 1`` chunk-forwards (Megatron-LM's
    schedule), each half of the rank's layers. Without pipelining: 1.
    """
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "1f1b":
        return float(min(microbatches, pp - rank))
    v = _chunks(schedule)
    chunks = min(microbatches * v, (v - 1) * pp + 2 * (pp - 1 - rank) + 1)
    return chunks / v


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Layers of each pipeline stage: contiguous, as even as possible, the first
    ``num_layers % stages`` stages one layer longer."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for k in range(stages):
        n = base + (1 if k < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass
class _LayerStats:
    """Per-rank figures of one layer type under one (tp, ep, shard) split."""

    local: int = 0  # elements this rank holds before FSDP (its TP/EP share)
    shard: int = 0  # elements after FSDP sharding (padded)
    gather: int = 0  # elements FSDP all-gathers into (local of the FSDP-sharded groups)
    local_rep: int = 0  # elements of FSDP-replicated-only groups (dp all-reduce input)
    exp_local: int = 0
    exp_shard: int = 0
    flops_fwd_token: float = 0.0  # matmul FLOPs per token forward on this rank


def _shard_numel(shape: tuple[int, ...], n: int) -> int:
    """FSDP2 shards dim 0 into ``n`` equal chunks, padding the last: ``ceil(d0/n) * rest``."""
    return -(-shape[0] // n) * math.prod(shape[1:])


def _local_shape(g: ParamGroup, tp: int) -> tuple[int, ...]:
    if g.tp_dim is None or tp == 1 or g.expert:
        return g.shape
    shape = list(g.shape)
    shape[g.tp_dim] //= tp
    return tuple(shape)


def _group_stats(
    groups: list[ParamGroup], tp: int, ep: int, shard: int, exp_shard: int, sp: bool
) -> _LayerStats:
    st = _LayerStats()
    for g in groups:
        shape = _local_shape(g, tp)
        if g.expert:
            count = g.count // ep
            n = math.prod(shape) * count
            st.exp_local += n
            st.exp_shard += _shard_numel(shape, exp_shard) * count if exp_shard > 1 else n
            if exp_shard > 1:
                st.gather += n
        else:
            n = math.prod(shape)
            st.local += n
            st.shard += _shard_numel(shape, shard) if shard > 1 else n
            if shard > 1:
                st.gather += n
        if g.matmul:
            if g.expert:  # top-k of E experts per token; TP ranks split the tokens under SP
                per_token = 2 * math.prod(g.shape) * g.count
                st.flops_fwd_token += per_token / (tp if sp else 1)
            elif g.tp_dim is None:  # replicated weights: every TP rank does all the work
                st.flops_fwd_token += 2 * math.prod(g.shape)
            else:
                st.flops_fwd_token += 2 * math.prod(g.shape) / tp
    return st


class _Model:
    """A config's parameter groups and per-layer activation/FLOP figures, computed once."""

    def __init__(self, config: ModelConfig) -> None:
        c = self.c = config
        self.counts = param_counts(c)
        self.moe_layer = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)]
        self.groups = {False: layer_param_groups(c, False)}
        if any(self.moe_layer):
            self.groups[True] = layer_param_groups(c, True)
        self.first, self.last = root_param_groups(c)
        self._cache: dict[tuple, _LayerStats] = {}

    def stats(self, kind, tp: int, ep: int, shard: int, exp_shard: int, sp: bool) -> _LayerStats:
        key = (kind, tp, ep, shard, exp_shard, sp)
        if key not in self._cache:
            groups = {"first": self.first, "last": self.last}.get(kind) or self.groups[kind]
            st = _group_stats(groups, tp, ep, shard, exp_shard, sp)
            if kind in (False, True):
                k_over_e = self.c.num_experts_per_tok / self.c.n_routed_experts if kind else 0
                exp_flops = sum(
                    2 * math.prod(g.shape) * g.count for g in groups if g.expert and g.matmul
                ) / (tp if sp else 1)
                st.flops_fwd_token += exp_flops * (k_over_e - 1)  # keep only the top-k share
            self._cache[key] = st
        return self._cache[key]

    def attn_flops_fwd_token(self, seq_len: int) -> float:
        """Score and value products per token forward, one layer, no causal discount:
        ``2 s n_h d_qk + 2 s n_h d_v``."""
        c = self.c
        v = c.v_head_dim if c.is_mla else c.head_dim
        return 2 * seq_len * c.num_attention_heads * (c.qk_head_dim + v)

    def act_bytes_token(self, moe: bool, tp: int, sp: bool, ab: int, scores: bool, s: int) -> float:
        """Saved activation bytes per token of one layer on one TP rank (see docs/planner.md)."""
        c = self.c
        h, nh = c.hidden_size, c.num_attention_heads
        seq_split = tp if sp else 1  # norms' inputs/outputs, the routed tokens
        out = 0.0
        # attention block: norm input, norm output (the projections' input)
        out += 2 * h * ab / seq_split
        if c.is_mla:
            v = c.v_head_dim
            if c.q_lora_rank is not None:  # q_a output and its norm output (replicated)
                out += 2 * c.q_lora_rank * ab
            out += (2 * c.kv_lora_rank + c.qk_rope_head_dim) * ab  # kv_a output + norm output
            out += (2 * nh * c.qk_head_dim + 2 * nh * v) * ab / tp  # q, k, v, attention output
        else:
            d, nkv = c.head_dim, c.num_key_value_heads
            out += (2 * nh * d + 2 * nkv * d) * ab / tp
        out += nh * 4 / tp  # the softmax log-sum-exp (fp32) of memory-efficient attention
        if scores:  # a materialised softmax (no flash attention): one score row per head
            out += nh * s * ab / tp
        # MLP block: norm input, norm output
        out += 2 * h * ab / seq_split
        if moe:
            e, k, mi = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
            out += 2 * e * 4 / seq_split  # router logits and scores, fp32
            out += k * (2 * h + 4 * mi) * ab / seq_split  # routed: input, 4 x width, output
            if c.n_shared_experts:
                out += 4 * mi * c.n_shared_experts * ab / tp
        else:
            out += 4 * c.intermediate_size * ab / tp  # gate, silu(gate), up, product
        return out


def _group_intra(stride: int, size: int, gpus_per_node: int) -> bool:
    return size == 1 or stride * size <= gpus_per_node


def tp_collectives(
    config: ModelConfig,
    dense_layers: int,
    moe_layers: int,
    first: bool,
    last: bool,
    sp: bool,
    full_ac: bool = False,
) -> dict[str, tuple[int, int]]:
    """The TP collectives of one microbatch on a rank, as deepwhale's plan
    (:mod:`deepwhale.parallel.tp`) runs them on torch's ``ColwiseParallel`` / ``RowwiseParallel``
    / ``SequenceParallel``: ``{op: (elements per token summed over calls, calls)}``, where one
    call moves ``elements per token x tokens`` (an all-gather's payload is its input, ``1/tp``
    of that; the caller divides).

    Counted from traces of the real runs (``DEEPWHALE_COUNT_COMM=trace``, torch 2.13), ``H`` the
    hidden size:

    * every column-parallel projection all-reduces the gradient of its own (replicated) input
      in backward — torch does not merge the projections that share an input, so GQA attention
      costs 3 all-reduces of ``H`` (q, k, v), MLA one of ``q_lora_rank`` (``q_b_proj``; ``H``
      for ``q_proj``) plus one of ``kv_lora_rank`` (``kv_b_proj``) plus the RoPE-key gradient
      hook's ``qk_rope_head_dim``, a SwiGLU MLP 2 of ``H`` (gate, up); the sequence-parallel
      all-gather before the block then has nothing to reduce-scatter in backward;
    * the row-parallel output: an all-reduce of ``H`` without SP, an all-gather + a
      reduce-scatter (forward; an all-gather in backward) with SP;
    * DeepSeekMoE under SP: all-gather the input, the shared experts' ``down_proj`` all-reduces
      ``H`` (row-parallel to a replicated output), the output is sliced back to this rank's
      tokens (backward: an all-gather); without shared experts a MoE layer sends nothing;
    * vocabulary-parallel embedding: all-reduce (or reduce-scatter under SP, all-gather in
      backward); the column-parallel ``lm_head``: an all-reduce of its input gradient (SP: an
      all-gather forward, a reduce-scatter backward);
    * full activation checkpointing repeats the layers' forward collectives in backward.
    """
    c = config
    h = c.hidden_size
    ops: dict[str, list[int]] = {
        "all_gather": [0, 0],
        "reduce_scatter": [0, 0],
        "all_reduce": [0, 0],
    }

    def add(op: str, elems: int, calls: int) -> None:
        if calls:
            ops[op][0] += elems * calls
            ops[op][1] += calls

    def row_out(calls: int, fwd_only: bool = False) -> None:
        if sp:
            add("all_gather", h, calls)  # forward, before the block
            add("reduce_scatter", h, calls)  # forward, after it
            if not fwd_only:
                add("all_gather", h, calls)  # backward of the reduce-scatter
        else:
            add("all_reduce", h, calls)

    if c.is_mla:
        q_in = h if c.q_lora_rank is None else c.q_lora_rank
        attn_bwd = [q_in, c.kv_lora_rank, c.qk_rope_head_dim]
    else:
        attn_bwd = [h, h, h]
    n = dense_layers + moe_layers
    passes = 2 if full_ac else 1  # forward, and the recomputed forward
    row_out(n * passes, fwd_only=True)
    if sp:
        add("all_gather", h, n)  # backward of the attention's reduce-scatter
    for e in attn_bwd:
        add("all_reduce", e, n)
    row_out(dense_layers * passes, fwd_only=True)
    if sp:
        add("all_gather", h, dense_layers)
    add("all_reduce", h, 2 * dense_layers)
    if c.n_shared_experts:
        if sp:
            add("all_gather", h, moe_layers * passes)  # the MoE input
            add("all_gather", h, moe_layers)  # backward of the output slice
        add("all_reduce", h, moe_layers * passes)  # shared down_proj, forward
        add("all_reduce", h, 2 * moe_layers)  # shared gate/up input gradients
    if first:
        if sp:
            add("reduce_scatter", h, 1)
            add("all_gather", h, 1)
        else:
            add("all_reduce", h, 1)
    if last:
        if sp:
            add("all_gather", h, 1)
            add("reduce_scatter", h, 1)
        else:
            add("all_reduce", h, 1)
    return {op: (e, k) for op, (e, k) in ops.items() if k}


def estimate(
    model_config: ModelConfig,
    layout: ParallelLayout,
    micro_batch_size: int,
    seq_len: int,
    microbatches: int = 1,
    *,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optim_bytes_per_param: int = 12,
    activation_bytes: int = 2,
    activation_checkpointing: str = "none",
    attention_scores_saved: bool = False,
    ddp_sync_every_microbatch: bool = False,
    fsdp_sync_every_microbatch: bool = True,
    hardware: Hardware | None = None,
    _model: _Model | None = None,
) -> Estimate:
    """Memory, communication and FLOPs of one optimizer step of ``layout`` (and its time, given
    ``hardware``).

    Args:
        model_config: the model.
        layout: a layout whose ``dp`` is set (``layout.resolved(world)``); checked with
            :func:`~deepwhale.parallel.layout.check_layout`.
        micro_batch_size: sequences per microbatch, b.
        seq_len: tokens per sequence, s.
        microbatches: microbatches per step per data-parallel rank, m (``pp`` microbatches, or
            gradient accumulation steps without ``pp``; ``layout.microbatches`` when that is set
            and this is left at 1).
        param_bytes: bytes per parameter element (bf16 training: 2; fp32: 4).
        grad_bytes: bytes per gradient element, also the dtype of the gradient collectives.
        optim_bytes_per_param: AdamW state bytes per parameter: 12 for bf16 mixed precision
            (fp32 master copy + m + v), 8 for fp32 training (m + v, no master copy).
        activation_bytes: bytes per activation element (2 for bf16, 4 for fp32), also the dtype
            of TP, PP and EP messages.
        activation_checkpointing: ``none`` or ``full`` (each decoder layer recomputed in
            backward).
        attention_scores_saved: attention materialises the ``(a, s, s)`` softmax (no
            flash/memory-efficient kernel): adds Korthikanti's ``a s / h`` term.
        ddp_sync_every_microbatch: the data-parallel all-reduce runs after every microbatch
            (no ``no_sync`` during gradient accumulation) instead of once per step.
        fsdp_sync_every_microbatch: FSDP2 reduce-scatters gradients after every microbatch (its
            default); False keeps unsharded gradients until the last one
            (``set_requires_gradient_sync(False)``), which counts them in memory.
        hardware: the cluster; None leaves the time fields None.

    Returns:
        An :class:`Estimate` (bytes, FLOPs, seconds).

    Raises:
        LayoutError: the layout does not resolve to its own product or fails ``check_layout``.
        PlanError: a non-positive batch, length or byte count, or an unknown checkpointing mode.
    """
    c = model_config
    if layout.dp is None:
        raise LayoutError("estimate needs a resolved layout (dp set): use layout.resolved(world)")
    if microbatches == 1 and layout.microbatches:
        microbatches = layout.microbatches
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("seq_len", seq_len),
        ("microbatches", microbatches),
        ("param_bytes", param_bytes),
        ("grad_bytes", grad_bytes),
        ("activation_bytes", activation_bytes),
    ):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if optim_bytes_per_param < 0:
        raise PlanError(f"optim_bytes_per_param must be >= 0, got {optim_bytes_per_param}")
    if activation_checkpointing not in ("none", "full"):
        raise PlanError(
            f"activation_checkpointing must be none or full, got {activation_checkpointing!r}"
        )
    check_layout(layout, c, seq_len)
    m_ = _model or _Model(c)
    tp, pp, ep, dp, shard = layout.tp, layout.pp, layout.ep, layout.dp, layout.dp_shard
    dp_total = dp * shard
    world = dp_total * tp * pp
    sp = layout.sequence_parallel and tp > 1
    exp_shard = shard // math.gcd(shard, ep)
    exp_rep = dp_total // (ep * exp_shard)
    b, s, m = micro_batch_size, seq_len, microbatches
    ab = activation_bytes
    full_ac = activation_checkpointing == "full"
    schedule = layout.pp_schedule if pp > 1 else "1f1b"
    v = _chunks(schedule) if pp > 1 else 1
    stages = stage_layers(c.num_hidden_layers, pp * v)
    tokens_mb = b * s  # tokens per microbatch per data-parallel rank
    gpn = hardware.gpus_per_node if hardware else world
    st_first = m_.stats("first", tp, ep, shard, exp_shard, sp)
    st_last = m_.stats("last", tp, ep, shard, exp_shard, sp)
    attn_fwd = m_.attn_flops_fwd_token(s)

    memories: list[Memory] = []
    rank_comm: list[list[Collective]] = []
    rank_flops: list[float] = []
    seen: dict[tuple, tuple[Memory, list[Collective], float]] = {}
    moe_prefix = [0]  # MoE layers before each stage boundary
    for st in stages:
        moe_prefix.append(moe_prefix[-1] + sum(m_.moe_layer[i] for i in st))
    for r in range(pp):
        my_stages = range(r, pp * v, pp)
        layers = [i for k in my_stages for i in stages[k]]
        n_moe = sum(moe_prefix[k + 1] - moe_prefix[k] for k in my_stages)
        flight = in_flight_microbatches(schedule, pp, r, m)
        key = (len(layers), n_moe, 0 in my_stages, pp * v - 1 in my_stages, flight)
        if key in seen:  # ranks with the same share of layers cost the same
            mem, comm, flops = seen[key]
            memories.append(dataclasses.replace(mem))
            rank_comm.append(comm)
            rank_flops.append(flops)
            continue
        by_kind = [(kind, n) for kind, n in ((False, len(layers) - n_moe), (True, n_moe)) if n]
        kinds = [(m_.stats(kind, tp, ep, shard, exp_shard, sp), n) for kind, n in by_kind]
        roots = ([st_first] if 0 in my_stages else []) + (
            [st_last] if pp * v - 1 in my_stages else []
        )
        weighted = kinds + [(u, 1) for u in roots]
        local = sum(u.local * n for u, n in weighted)
        shard_n = sum(u.shard * n for u, n in weighted)
        exp_local = sum(u.exp_local * n for u, n in weighted)
        exp_shard_n = sum(u.exp_shard * n for u, n in weighted)
        held = shard_n + exp_shard_n
        if ep == 1:  # without EP the experts are ordinary parameters of the same groups
            local, shard_n, exp_local, exp_shard_n = local + exp_local, held, 0, 0
        n_units = len(layers) + len(roots)
        mem = Memory()
        mem.params = held * param_bytes
        unsharded_grads = (shard > 1 or exp_shard > 1) and not fsdp_sync_every_microbatch
        mem.grads = (local + exp_local if unsharded_grads else held) * grad_bytes
        if tp > 1 and shard == 1 and 0 in my_stages:
            # torch's embedding backward on a vocabulary-parallel (Shard(0)) weight returns a
            # Replicate gradient: every TP rank holds the full (V, H) gradient (torch 2.13)
            full = c.vocab_size * c.hidden_size
            mem.grads += (full - _shard_numel((c.vocab_size, c.hidden_size), tp)) * grad_bytes
        mem.optimizer = held * optim_bytes_per_param
        if shard > 1 or exp_shard > 1:
            biggest = max((u.gather for u, _ in kinds), default=0)
            root_gather = sum(u.gather for u in roots)
            mem.fsdp_buffers = (2 * biggest + root_gather) * param_bytes
            if not unsharded_grads:
                mem.fsdp_buffers += biggest * grad_bytes
        # activations: in-flight microbatches x this rank's layers, + logits on the last stage
        per_layer = {
            kind: m_.act_bytes_token(kind, tp, sp, ab, attention_scores_saved, s) * tokens_mb
            for kind, _ in by_kind
        }
        no_ac = flight * sum(per_layer[kind] * n for kind, n in by_kind)
        layer_input = c.hidden_size * ab * tokens_mb / (tp if sp else 1)
        with_ac = flight * layer_input * len(layers) + max(per_layer.values(), default=0)
        logits = 0.0
        if pp * v - 1 in my_stages:  # bf16 logits + their fp32 copy for the loss, V/t columns
            last_flight = in_flight_microbatches(schedule, pp, r, m) if schedule == "gpipe" else 1
            logits = last_flight * tokens_mb * (c.vocab_size / tp) * (ab + 4)
        mem.activations_no_ac = int(no_ac + logits)
        mem.activations_full_ac = int(with_ac + logits)
        mem.activations = mem.activations_full_ac if full_ac else mem.activations_no_ac
        memories.append(mem)

        # ------------------------------------------------------------ communication
        comm: list[Collective] = []
        sync_dp = m if ddp_sync_every_microbatch else 1
        sync_fsdp = m if fsdp_sync_every_microbatch else 1
        intra_shard = _group_intra(tp, shard, gpn)
        fsdp_parts = (
            ("", shard, shard_n, n_units, roots),
            (" (experts)", exp_shard, exp_shard_n, n_moe, []),
        )
        for label, n, sh, n_calls, rooted in fsdp_parts:
            if n > 1 and sh:
                bwd = sh - sum(u.shard for u in rooted)  # FSDP2 keeps the root gathered
                for what, payload, calls in (
                    ("params fwd", sh * param_bytes * m, n_calls * m),
                    ("params bwd", bwd * param_bytes * m, (n_calls - len(rooted)) * m),
                ):
                    comm.append(
                        Collective(
                            "dp_shard",
                            "all_gather",
                            what + label,
                            n,
                            calls,
                            payload,
                            payload * n,
                            (n - 1) / n * payload * n,
                            intra_shard,
                        )
                    )
                full = sh * n * grad_bytes * sync_fsdp
                comm.append(
                    Collective(
                        "dp_shard",
                        "reduce_scatter",
                        "grads" + label,
                        n,
                        n_calls * sync_fsdp,
                        full,
                        full // n,
                        (n - 1) / n * full,
                        intra_shard,
                    )
                )
        for label, n, numel, sharded in (
            ("", dp, shard_n if shard > 1 else local, shard > 1),
            (" (experts)", exp_rep, exp_shard_n if exp_shard > 1 else exp_local, exp_shard > 1),
        ):
            if n > 1 and numel:
                sync = sync_fsdp if sharded else sync_dp  # HSDP all-reduces after each RS
                size = numel * grad_bytes * sync
                comm.append(
                    Collective(
                        "dp",
                        "all_reduce",
                        "grads" + label,
                        n,
                        sync,
                        size,
                        size,
                        2 * (n - 1) / n * size,
                        _group_intra(tp * shard, n, gpn),
                    )
                )
        if tp > 1:
            first, last = 0 in my_stages, pp * v - 1 in my_stages
            ops = tp_collectives(c, len(layers) - n_moe, n_moe, first, last, sp, full_ac)
            for op, (elems, calls) in ops.items():
                payload = elems * tokens_mb * ab // (tp if op == "all_gather" else 1) * m
                out_b = payload * tp if op == "all_gather" else payload // tp
                if op == "all_reduce":
                    out_b, wire = payload, 2 * (tp - 1) / tp * payload
                else:  # (n-1)/n of the full size
                    wire = (tp - 1) / tp * max(payload, out_b)
                comm.append(
                    Collective("tp", op, "activations", tp, calls * m, payload, out_b, wire)
                )
            if last:  # loss parallel: max, sum of exp, target logit (fp32)
                small = tokens_mb * 4 * 3 * m
                comm.append(
                    Collective(
                        "tp",
                        "all_reduce",
                        "loss statistics",
                        tp,
                        3 * m,
                        small,
                        small,
                        2 * (tp - 1) / tp * small,
                    )
                )
        if pp > 1:
            msg = tokens_mb * c.hidden_size * ab // (tp if sp else 1)
            sends = sum((k < pp * v - 1) + (k > 0) for k in my_stages) * m
            comm.append(
                Collective(
                    "pp",
                    "send",
                    "activations fwd + grads bwd",
                    2,
                    sends,
                    msg * sends,
                    msg * sends,
                    msg * sends,
                    _group_intra(tp * dp_total, pp, gpn),
                )
            )
        if ep > 1 and n_moe:
            per = tokens_mb // (tp if sp else 1) * c.num_experts_per_tok * c.hidden_size * ab
            n_ops = n_moe * (4 + (2 if full_ac else 0)) * m
            comm.append(
                Collective(
                    "ep",
                    "all_to_all",
                    "tokens dispatch + combine",
                    ep,
                    n_ops,
                    per * n_ops,
                    per * n_ops,
                    (ep - 1) / ep * per * n_ops,
                    _group_intra(tp, ep, gpn),
                )
            )
        rank_comm.append(comm)

        # ------------------------------------------------------------ FLOPs
        fwd_token = sum(u.flops_fwd_token * n for u, n in kinds) + len(layers) * attn_fwd / 2 / tp
        passes = 3 + (1 if full_ac else 0)
        flops = fwd_token * passes * tokens_mb * m
        if pp * v - 1 in my_stages:  # the output head (tied or not) multiplies V x H
            flops += 2 * c.vocab_size * c.hidden_size / tp * 3 * tokens_mb * m
        rank_flops.append(flops)
        seen[key] = (mem, comm, flops)

    counts = m_.counts
    global_tokens = dp_total * m * b * s
    model_flops = global_tokens * (6 * counts.active_matmul + 3 * c.num_hidden_layers * attn_fwd)
    heaviest = max(range(pp), key=lambda r: memories[r].total)
    busiest_comm = {}
    unique = {id(comm): (r, comm) for r, comm in enumerate(rank_comm)}
    for r, comm in unique.values():
        for dim in {x.dim for x in comm}:
            wire = sum(x.wire_bytes for x in comm if x.dim == dim)
            if dim not in busiest_comm or wire > busiest_comm[dim][0]:
                busiest_comm[dim] = (wire, r)
    comm_out = [
        x for dim, (_, r) in sorted(busiest_comm.items()) for x in rank_comm[r] if x.dim == dim
    ]
    est = Estimate(
        layout=layout,
        micro_batch_size=b,
        seq_len=s,
        microbatches=m,
        activation_checkpointing=activation_checkpointing,
        global_batch_tokens=global_tokens,
        params=counts,
        memory=memories[heaviest],
        memory_by_stage=memories,
        comm=comm_out,
        bubble_fraction=bubble_fraction(pp, m, schedule) if pp > 1 else 0.0,
        model_flops=model_flops,
        executed_flops_per_gpu=max(rank_flops),
    )
    if hardware is not None:
        _add_time(est, hardware, world)
    return est


def _add_time(est: Estimate, hw: Hardware, world: int) -> None:
    """Fill the time fields: compute at ``gpu_tflops x compute_efficiency``, inflated by the
    bubble; TP, PP and EP traffic on the critical path; DP/FSDP traffic overlapped with compute
    (see docs/planner.md, "Time")."""
    peak = hw.gpu_tflops * 1e12 * hw.compute_efficiency
    compute = est.executed_flops_per_gpu / peak
    pipelined = compute / (1 - est.bubble_fraction)

    def seconds(c: Collective) -> float:
        gbps = hw.intra_node_gbps if c.intra_node else hw.inter_node_gbps
        return c.wire_bytes / (gbps * 1e9 / 8)

    comm_s: dict[str, float] = {}
    for dim in ("tp", "pp", "ep"):
        t = sum(seconds(c) for c in est.comm if c.dim == dim)
        if t:
            comm_s[dim] = t
    # FSDP gathers and reduce-scatters run under every microbatch's compute
    fsdp = sum(seconds(c) for c in est.comm if c.dim == "dp_shard")
    if fsdp:
        comm_s["dp_shard"] = max(0.0, fsdp - compute)
    # the replicate all-reduce overlaps the backward (2/3 of the compute) of its microbatches
    dp = sum(seconds(c) for c in est.comm if c.dim == "dp")
    if dp:
        calls = max(c.calls for c in est.comm if c.dim == "dp")
        overlap = (2 / 3) * compute * calls / est.microbatches
        comm_s["dp"] = max(0.0, dp - overlap)
    est.compute_s = compute
    est.comm_s = comm_s
    est.step_s = pipelined + sum(comm_s.values())
    est.tokens_per_s_per_gpu = est.global_batch_tokens / est.step_s / world
    est.mfu = est.model_flops / (world * hw.gpu_tflops * 1e12 * est.step_s)


# ----------------------------------------------------------------------------------- planning
@dataclass
class Candidate:
    """One ranked layout of :func:`plan`.

    Attributes:
        layout: the resolved layout (``describe(layout)`` gives ``dp=..,tp=..``).
        estimate: its :class:`Estimate` (with the time fields).
        fits: ``estimate.memory.total <= gpu_mem_bytes x usable_mem_fraction``.
    """

    layout: ParallelLayout
    estimate: Estimate
    fits: bool

    @property
    def name(self) -> str:
        """``dp=4,dp_shard=2,tp=8`` and the schedule when pipelined."""
        text = describe(self.layout)
        if self.layout.pp > 1:
            text += f" {self.layout.pp_schedule}"
        return text


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(
    model_config: ModelConfig,
    gpus: int,
    gpu_mem_bytes: int,
    gpu_tflops: float,
    seq_len: int,
    global_batch_tokens: int,
    nodes: int = 1,
    inter_node_gbps: float = 400.0,
    intra_node_gbps: float = 3600.0,
    *,
    activation_checkpointing: str = "auto",
    compute_efficiency: float = 0.5,
    usable_mem_fraction: float = 0.9,
    schedules: tuple[str, ...] = ("1f1b", "interleaved_1f1b"),
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optim_bytes_per_param: int = 12,
    activation_bytes: int = 2,
    include_unfit: bool = False,
) -> list[Candidate]:
    """Rank every layout of ``gpus`` GPUs by predicted tokens/s per GPU.

    Enumerates ``tp`` dividing the GPUs of one node, ``pp``, ``dp_shard`` and ``dp`` with
    ``dp * dp_shard * tp * pp == gpus``, ``ep`` dividing ``dp * dp_shard`` and the routed
    experts, each pipeline schedule in ``schedules`` and each microbatch size that divides the
    sequences per data-parallel rank; keeps the layouts :func:`check_layout` accepts; estimates
    each (:func:`estimate`), trying no activation checkpointing first under ``auto``; keeps the
    fastest microbatch size per layout.

    Args:
        model_config: the model.
        gpus: world size.
        gpu_mem_bytes: memory of one GPU, bytes.
        gpu_tflops: peak dense TFLOP/s of one GPU.
        seq_len: tokens per sequence.
        global_batch_tokens: tokens per optimizer step; rounded to a whole number of sequences
            per data-parallel rank (the estimate reports the tokens it used).
        nodes: nodes the GPUs are spread over (``gpus / nodes`` per node).
        inter_node_gbps, intra_node_gbps: per-GPU one-direction bandwidths, Gb/s.
        activation_checkpointing: ``auto`` (none when it fits, else full), ``none`` or ``full``.
        compute_efficiency: share of peak FLOP/s the matrix products reach.
        usable_mem_fraction: share of ``gpu_mem_bytes`` a layout may use (the rest is the CUDA
            context, NCCL buffers and allocator fragmentation).
        schedules: pipeline schedules tried for ``pp > 1``.
        micro_batch_sizes: microbatch sizes tried, sequences.
        param_bytes, grad_bytes, optim_bytes_per_param, activation_bytes: see :func:`estimate`.
        include_unfit: also return layouts that do not fit (ranked after those that do).

    Returns:
        Candidates, fastest first; with ``include_unfit=False`` only those that fit.

    Raises:
        PlanError: a non-positive GPU count, memory, TFLOP/s, length or batch; GPUs that do not
            split evenly over ``nodes``; a batch smaller than one sequence per data-parallel rank
            for every layout; no layout that fits (the message names the smallest footprint).
    """
    for name, value in (("gpus", gpus), ("nodes", nodes), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if gpu_mem_bytes <= 0 or global_batch_tokens <= 0:
        raise PlanError("gpu memory and global batch tokens must be > 0")
    if gpus % nodes:
        raise PlanError(f"{gpus} GPUs do not split evenly over {nodes} nodes")
    if activation_checkpointing not in ("auto", "none", "full"):
        raise PlanError(
            f"activation checkpointing must be auto, none or full, got {activation_checkpointing!r}"
        )
    if not 0 < usable_mem_fraction <= 1:
        raise PlanError(f"usable_mem_fraction must be in (0, 1], got {usable_mem_fraction}")
    gpn = gpus // nodes
    hw = Hardware(gpu_tflops, compute_efficiency, gpn, intra_node_gbps, inter_node_gbps)
    budget = gpu_mem_bytes * usable_mem_fraction
    c = model_config
    model = _Model(c)
    sequences = global_batch_tokens / seq_len
    ac_modes = (
        ("none", "full") if activation_checkpointing == "auto" else (activation_checkpointing,)
    )
    experts = c.n_routed_experts or 0
    best: dict[tuple, Candidate] = {}
    any_batch = False
    for tp in _divisors(gpn):
        for pp in _divisors(gpus // tp):
            if pp > c.num_hidden_layers:
                continue
            dp_total = gpus // (tp * pp)
            per_rank = round(sequences / dp_total)
            if per_rank < 1:
                continue
            any_batch = True
            for shard in _divisors(dp_total):
                eps = [e for e in _divisors(dp_total) if experts and experts % e == 0] or [1]
                for ep in eps:
                    for sched in schedules if pp > 1 else ("1f1b",):
                        layout = ParallelLayout(
                            dp=dp_total // shard,
                            dp_shard=shard,
                            tp=tp,
                            pp=pp,
                            ep=ep,
                            pp_schedule=sched,
                        )
                        try:
                            check_layout(layout, c, seq_len)
                        except LayoutError:
                            continue
                        key = (layout.dp, shard, tp, pp, ep, sched)
                        for mbs in micro_batch_sizes:
                            if per_rank % mbs:
                                continue
                            m = per_rank // mbs
                            if sched == "interleaved_1f1b" and m % pp:
                                continue  # Megatron-LM's interleaved schedule needs m % p == 0
                            cand = _try(
                                model,
                                layout,
                                mbs,
                                seq_len,
                                m,
                                ac_modes,
                                budget,
                                hw,
                                param_bytes,
                                grad_bytes,
                                optim_bytes_per_param,
                                activation_bytes,
                            )
                            old = best.get(key)
                            if old is None or _rank_key(cand) < _rank_key(old):
                                best[key] = cand
    if not any_batch:
        raise PlanError(
            f"global batch of {global_batch_tokens} tokens is {sequences:.3g} sequences of "
            f"{seq_len}: fewer than one per data-parallel rank of every layout; raise "
            "--global-batch-tokens"
        )
    ranked = sorted(best.values(), key=_rank_key)
    fitting = [x for x in ranked if x.fits]
    if not fitting and not include_unfit:
        if not ranked:
            raise PlanError(f"no valid layout of {gpus} GPUs for this model (check_layout)")
        small = min(ranked, key=lambda x: x.estimate.memory.total)
        raise PlanError(
            f"no layout fits in {format_bytes(gpu_mem_bytes)} per GPU "
            f"({usable_mem_fraction:.0%} usable); the smallest, {small.name}, needs "
            f"{format_bytes(small.estimate.memory.total)}; add GPUs or memory"
        )
    return ranked if include_unfit else fitting


def _try(model, layout, mbs, seq_len, m, ac_modes, budget, hw, pb, gb, ob, ab) -> Candidate:
    est = None
    for ac in ac_modes:
        est = estimate(
            model.c,
            layout,
            mbs,
            seq_len,
            m,
            param_bytes=pb,
            grad_bytes=gb,
            optim_bytes_per_param=ob,
            activation_bytes=ab,
            activation_checkpointing=ac,
            hardware=hw,
            _model=model,
        )
        if est.memory.total <= budget:
            return Candidate(layout, est, True)
    return Candidate(layout, est, False)


def _rank_key(c: Candidate) -> tuple:
    return (not c.fits, -c.estimate.tokens_per_s_per_gpu, c.estimate.memory.total)


# ------------------------------------------------------------------------------------ parsing
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def format_bytes(n: float) -> str:
    """``n`` bytes as ``12.3 GiB`` / ``4.0 MiB`` / ``512 B`` (powers of 1024)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _split_number(text: str) -> tuple[float, str]:
    t = text.strip().replace("_", "").replace(",", "")
    i = len(t)
    while i and not (t[i - 1].isdigit() or t[i - 1] == "."):
        i -= 1
    try:
        value = float(t[:i])
    except ValueError:
        raise PlanError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"{text!r} must be a positive number")
    return value, t[i:].strip().lower()


def parse_size(text: str) -> int:
    """Bytes of ``80GB`` (10^9), ``80GiB`` (2^30), ``141 GB``, ``512MiB``, ``1.5TB``.

    Raises:
        PlanError: no number, a non-positive one, or a missing or unknown unit (the message
            lists the units).
    """
    value, unit = _split_number(text)
    if unit not in _SIZE_UNITS:
        raise PlanError(
            f"size {text!r} needs a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, "
            "TiB (powers of 1024)"
        )
    return int(value * _SIZE_UNITS[unit])


def parse_count(text: str) -> int:
    """An integer count from ``4096``, ``1.5k``, ``4M``, ``63M``, ``2B`` (powers of 1000).

    Raises:
        PlanError: no number, a non-positive one, an unknown suffix or a result below 1.
    """
    value, unit = _split_number(text)
    if unit not in _COUNT_UNITS:
        raise PlanError(f"count {text!r}: unknown suffix {unit!r}; use k, M, B or T")
    n = round(value * _COUNT_UNITS[unit])
    if n < 1:
        raise PlanError(f"count {text!r} is below 1")
    return n


def load_model_config(spec: str) -> tuple[ModelConfig, str]:
    """The model ``deepwhale plan --model`` names, and a label for it.

    ``spec`` is a release in :data:`KNOWN_MODELS` (``deepseek-v3-671b``), a flavour of
    :mod:`deepwhale.model.flavours` (``debug-v3``), a folder holding ``config.json`` or a
    ``config.json`` path.

    Raises:
        PlanError: none of these (the message lists the names); ConfigError: a config.json that
            does not parse or validate.
    """
    from pathlib import Path

    from deepwhale.model.flavours import FLAVOURS, flavour_config

    if spec in KNOWN_MODELS:
        return known_model_config(spec), spec
    if spec in FLAVOURS:
        return flavour_config(spec), spec
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{spec}: folder has no config.json")
    if path.is_file():
        return ModelConfig.from_json_file(path), str(spec)
    raise PlanError(
        f"unknown model {spec!r}: not a config.json, a folder with one, a release "
        f"({', '.join(KNOWN_MODELS)}) or a flavour ({', '.join(sorted(FLAVOURS))})"
    )


__all__ = [
    "KNOWN_MODELS",
    "Candidate",
    "Collective",
    "ConfigError",
    "Estimate",
    "Hardware",
    "Memory",
    "ParamCounts",
    "ParamGroup",
    "PlanError",
    "bubble_fraction",
    "estimate",
    "format_bytes",
    "in_flight_microbatches",
    "known_model_config",
    "layer_param_groups",
    "load_model_config",
    "param_counts",
    "parameter_shapes",
    "parse_count",
    "parse_size",
    "plan",
    "root_param_groups",
    "stage_layers",
]
