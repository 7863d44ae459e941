"""Tensor parallelism (and sequence parallelism) for every deepwhale layout, on
``torch.distributed.tensor.parallel``.

The plan follows Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053): in each block the first
projection is split by output columns and the second by input rows, so each block needs one
all-reduce forward and one backward. Applied per decoder layer:

* GQA (LLaMA, Qwen2): ``q_proj``/``k_proj``/``v_proj`` column-wise (whole heads per rank, so
  ``tp`` divides the query and key/value heads), ``o_proj`` row-wise.
* MLA (DeepSeek-V2/V3): ``q_proj`` (or ``q_b_proj``) and ``kv_b_proj`` column-wise by head,
  ``o_proj`` row-wise; the latent down-projections ``q_a_proj``/``kv_a_proj_with_mqa`` and their
  norms stay replicated. The shared RoPE key ``k_pe`` goes straight from the replicated
  ``kv_a_proj_with_mqa`` into every head, so its gradient on one rank sums only that rank's heads:
  a gradient hook all-reduces that slice over the TP group (the latent part already arrives
  complete through ``kv_b_proj``).
* Dense SwiGLU MLP: ``gate_proj``/``up_proj`` column-wise, ``down_proj`` row-wise.
* DeepSeekMoE: the router and the routed experts stay replicated (each TP rank runs them on the
  full sequence; :mod:`deepwhale.parallel.ep` shards the experts instead); the shared experts are
  split like a dense MLP.
* Embedding: vocabulary-parallel (row-wise); ``lm_head``: column-wise with the logits left
  sharded over the vocabulary, for loss parallel (:func:`loss_context`).
* Sequence parallelism (Korthikanti et al. 2022, arXiv:2205.05198), when enabled: the residual
  stream and the norms hold ``T / tp`` tokens per rank; the all-reduces become all-gather before
  attention/MLP and reduce-scatter after.

The model code stays single-device: attention reads its head count from the projections' output
(``view(b, t, -1, head_dim)``), which is all it needs to run on a shard.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from deepwhale.model.attention import MLA
from deepwhale.model.moe import MoE


def _allreduce_rope_grad(module: MLA, group) -> None:
    """Sum the gradient of ``k_pe`` (the last ``qk_rope_head_dim`` outputs of
    ``kv_a_proj_with_mqa``) over the TP group: each rank's heads contribute a part of it."""
    rope = module.rope_dim

    def hook(mod, args, output):
        if not output.requires_grad:
            return None

        def reduce(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            part = grad[..., -rope:].contiguous()  # (B, T, rope)
            dist.all_reduce(part, group=group)
            grad[..., -rope:] = part
            return grad

        output.register_hook(reduce)
        return None

    module.kv_a_proj_with_mqa.register_forward_hook(hook)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> None:
    """Shard ``model`` (a :class:`~deepwhale.model.transformer.CausalLM`, or a pipeline stage with
    the same attribute names) over the 1-D ``tp_mesh`` in place.

    After this, ``model(input_ids (B, T))`` returns a ``DTensor`` of logits ``(B, T, V)`` sharded
    over the vocabulary (``Shard(-1)``): compute the loss inside :func:`loss_context`.

    Args:
        model: the model; parts it lacks (a stage without ``lm_head``) are skipped.
        tp_mesh: the ``tp`` sub-mesh.
        sequence_parallel: shard norms and the residual stream along the sequence; ``T`` must
            then be divisible by the TP degree.

    Raises:
        ValueError: ``tp_mesh`` is not one-dimensional.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D, got {tp_mesh.ndim} dims")
    sp = sequence_parallel
    # the residual stream between blocks: sequence-sharded under SP, replicated otherwise
    stream = Shard(1) if sp else Replicate()
    stack = model.model
    top: dict[str, object] = {}
    if getattr(stack, "embed_tokens", None) is not None:
        top["model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=stream
        )
    if getattr(stack, "norm", None) is not None and sp:
        top["model.norm"] = SequenceParallel()
    if getattr(model, "lm_head", None) is not None:
        top["lm_head"] = ColwiseParallel(
            input_layouts=stream, output_layouts=Shard(-1), use_local_output=False
        )
    if top:
        parallelize_module(model, tp_mesh, top)

    group = tp_mesh.get_group()
    layers = stack.layers.values() if isinstance(stack.layers, nn.ModuleDict) else stack.layers
    for layer in layers:
        plan: dict[str, object] = {}
        attn, mlp = layer.self_attn, layer.mlp
        if sp:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
            # (x, cos, sin, positions, cache): gather the sequence before attention
            plan["self_attn"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
                use_local_output=True,
            )
        rowwise = RowwiseParallel(output_layouts=stream)
        if isinstance(attn, MLA):
            if attn.q_lora_rank is None:
                plan["self_attn.q_proj"] = ColwiseParallel()
            else:
                plan["self_attn.q_b_proj"] = ColwiseParallel()
            plan["self_attn.kv_b_proj"] = ColwiseParallel()
            plan["self_attn.o_proj"] = rowwise
            _allreduce_rope_grad(attn, group)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"self_attn.{name}"] = ColwiseParallel()
            plan["self_attn.o_proj"] = rowwise
        if isinstance(mlp, MoE):
            if sp:  # the router and routed experts see the full sequence
                plan["mlp"] = PrepareModuleInput(
                    input_layouts=(Shard(1),),
                    desired_input_layouts=(Replicate(),),
                    use_local_output=True,
                )
            if mlp.shared_experts is not None:
                plan["mlp.shared_experts.gate_proj"] = ColwiseParallel()
                plan["mlp.shared_experts.up_proj"] = ColwiseParallel()
                plan["mlp.shared_experts.down_proj"] = RowwiseParallel()
            parallelize_module(layer, tp_mesh, plan)
            if sp:  # the MoE output is complete on every rank: keep this rank's tokens
                parallelize_module(
                    mlp,
                    tp_mesh,
                    PrepareModuleOutput(
                        output_layouts=(Replicate(),),
                        desired_output_layouts=(Shard(1),),
                        use_local_output=True,
                    ),
                )
            continue
        if sp:
            plan["mlp"] = PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            )
        plan["mlp.gate_proj"] = ColwiseParallel()
        plan["mlp.up_proj"] = ColwiseParallel()
        plan["mlp.down_proj"] = rowwise
        parallelize_module(layer, tp_mesh, plan)


def loss_context(enabled: bool):
    """``torch.distributed.tensor.parallel.loss_parallel()`` when the logits are vocabulary
    sharded (TP), else a null context. Wrap both the cross-entropy and its ``backward``."""
    return loss_parallel() if enabled else contextlib.nullcontext()
