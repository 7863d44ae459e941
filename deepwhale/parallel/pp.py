"""Pipeline parallelism for :class:`~deepwhale.model.transformer.CausalLM`, applied from outside.

The model code is untouched. :func:`build_stage_module` cuts a stage out of a built model (sharing
its modules, not copying them) with parameter names identical to the full model's state-dict keys,
so a distributed checkpoint written under one pipeline layout loads under any other.
:func:`build_pipeline` wraps the local stages in ``torch.distributed.pipelining`` stages and a
schedule:

* ``gpipe`` — all forwards, then all backwards (GPipe, Huang et al. 2019, arXiv:1811.06965);
* ``1f1b`` — one forward, one backward in the steady state, so at most ``pp`` microbatches of
  activations are alive per rank (PipeDream-Flush / 1F1B, Narayanan et al. 2021, "Efficient
  Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", arXiv:2104.04473 §2.2);
* ``interleaved_1f1b`` — two stages per rank, "looped": rank ``r`` holds stages ``r`` and
  ``r + pp``, which shrinks the bubble by the number of local stages (same paper, §2.2.2).

Calling convention of ``schedule.step`` (torch 2.13): the rank holding stage 0 (pp rank 0 for all
three schedules) passes the whole window's ``input_ids`` positionally; the rank holding the last
stage (pp rank ``pp - 1``, also under ``interleaved_1f1b``) passes ``target=labels`` and a
``losses=[]`` list, which the schedule fills with one loss per microbatch; other ranks call
``schedule.step()``. The schedule splits the window along dim 0 into ``n_microbatches``.
:func:`pipeline_step` does this dispatch from the stage modules a rank holds, and
``pipeline_step(..., train=False)`` runs ``schedule.eval`` (forward only, no gradients) for
validation loss.

Loss scaling: the schedules are built with ``scale_grads=False`` and :class:`WindowTokenLoss`
returns ``sum of token cross-entropy / N`` with ``N`` the label tokens of the *whole* window (set
per step with :meth:`WindowTokenLoss.window`). The microbatch losses then sum to the window's mean
token loss and the accumulated gradient equals the single-process gradient of that mean, whatever
the microbatch split (the same rule as :meth:`deepwhale.train.trainer.Trainer.backward_window`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepwhale.model.transformer import CausalLM
from deepwhale.parallel.layout import LayoutError, ParallelLayout
from deepwhale.train.loss import token_cross_entropy_sum

IGNORE_INDEX = -100  # label value that carries no loss (deepwhale.train.data.IGNORE_INDEX)


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Cut ``n_layers`` decoder layers into ``n_stages`` contiguous ranges by layer count.

    Every stage gets ``n_layers // n_stages`` layers; the ``n_layers % n_stages`` extra layers go
    to the interior stages ``1 .. n_stages - 2`` first (in order), then to the first stage, and
    last to the last stage. The first stage also holds the embedding (a cheap lookup) and the last
    the final norm, ``lm_head`` and the loss (a ``(T, H) x (H, V)`` matmul plus softmax, often the
    costliest layer), so this keeps the ends no heavier than the middle (torchtitan balances its
    stages the same way). Deterministic: the same arguments give the same cut everywhere.

    Examples: ``(3, 2) -> [0:2, 2:3]``, ``(10, 4) -> [0:2, 2:5, 5:8, 8:10]``,
    ``(11, 4) -> [0:3, 3:6, 6:9, 9:11]``.

    Args:
        n_layers: decoder layers of the model (``config.num_hidden_layers``).
        n_stages: pipeline stages (``pp``, times 2 under ``interleaved_1f1b``).

    Returns:
        ``n_stages`` ranges of global layer indices covering ``range(n_layers)`` in order.

    Raises:
        ValueError: ``n_stages < 1`` or fewer layers than stages (every stage needs a layer).
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ValueError(
            f"cannot cut {n_layers} layers into {n_stages} pipeline stages: every stage needs at "
            "least one decoder layer; lower pp (or use gpipe/1f1b instead of interleaved_1f1b)"
        )
    base, extra = divmod(n_layers, n_stages)
    order = list(range(1, n_stages - 1)) + [0, n_stages - 1][: min(n_stages, 2)]
    counts = [base] * n_stages
    for s in order[:extra]:
        counts[s] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


class _StageStack(nn.Module):
    """The ``model.*`` part of one stage: optional ``embed_tokens``, ``layers`` keyed by the global
    layer index, optional ``norm``, and ``rotary_emb`` (non-persistent buffers only)."""

    def __init__(self, stack: nn.Module, layer_ids: range, first: bool, last: bool) -> None:
        super().__init__()
        if first:
            self.embed_tokens = stack.embed_tokens
        self.layers = nn.ModuleDict({str(i): stack.layers[i] for i in layer_ids})
        if last:
            self.norm = stack.norm
        self.rotary_emb = stack.rotary_emb


class StageModule(nn.Module):
    """One pipeline stage of a :class:`~deepwhale.model.transformer.CausalLM`.

    Built by :func:`build_stage_module`; it shares the full model's modules. Its ``state_dict``
    keys are the full model's keys for the parts it holds: ``model.embed_tokens.weight`` (first
    stage), ``model.layers.{i}.*`` with global ``i``, ``model.norm.weight`` and
    ``lm_head.weight`` (last stage). ``rotary_emb`` holds only the non-persistent ``inv_freq``, so
    every stage keeps its own copy without a state-dict key.

    ``forward(x)``: the first stage takes ``input_ids`` ``(B, T)`` int64, the others hidden states
    ``(B, T, H)``; positions are ``0 .. T-1`` for every row and the rotary tables are computed on
    the stage. The last stage returns logits ``(B, T, V)``, the others hidden states ``(B, T, H)``
    (before the final norm). No KV cache: this is the training/validation path.

    Attributes:
        stage_idx, n_stages: this stage's index and the pipeline's stage count.
        layer_ids: the global decoder-layer indices held.
        is_first, is_last: whether it holds the embedding / the norm and ``lm_head``.
    """

    def __init__(self, model: CausalLM, stage_idx: int, n_stages: int, layer_ids: range) -> None:
        super().__init__()
        self.config = model.config
        self.stage_idx, self.n_stages, self.layer_ids = stage_idx, n_stages, layer_ids
        #: the residual stream is split this many ways along the sequence (TP's sequence
        #: parallelism sets it to tp); positions and RoPE always cover the full sequence
        self.seq_shards = 1
        self.is_first, self.is_last = stage_idx == 0, stage_idx == n_stages - 1
        self.model = _StageStack(model.model, layer_ids, self.is_first, self.is_last)
        if self.is_last:
            self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids (first stage) or ``(B, T, H)`` hidden -> ``(B, T, H)`` or ``(B, T, V)``.

        Raises:
            ValueError: the first stage got a tensor that is not ``(B, T)`` or ids outside
                ``[0, vocab_size)``.
        """
        if self.is_first:
            if x.dim() != 2:
                raise ValueError(f"input_ids must be (batch, seq_len), got {tuple(x.shape)}")
            vocab = self.config.vocab_size
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
                raise ValueError(
                    f"token ids must be in [0, {vocab}), got [{int(x.min())}, {int(x.max())}]"
                )
            t = x.shape[1]
            x = self.model.embed_tokens(x)  # (B, T, H), or (B, T / tp, H) under SP
        else:  # under sequence parallelism the activations hold T / seq_shards tokens
            t = x.shape[1] * self.seq_shards
        b = x.shape[0]
        positions = torch.arange(t, device=x.device).expand(b, t)  # (B, T)
        cos, sin = self.model.rotary_emb(positions)  # (B, T, rope_dim/2)
        for layer in self.model.layers.values():
            x = layer(x, cos, sin, positions)  # (B, T, H)
        if self.is_last:
            x = self.lm_head(self.model.norm(x))  # (B, T, V)
        return x


def build_stage_module(model: CausalLM, stage_idx: int, n_stages: int) -> StageModule:
    """The part of ``model`` that pipeline stage ``stage_idx`` of ``n_stages`` runs.

    Layers are cut by :func:`stage_layer_ranges`. The returned module shares ``model``'s
    submodules (same parameter tensors, hooks such as
    :class:`~deepwhale.train.moe.RouterMonitor`'s keep firing); move it with ``.to(device)``.

    Args:
        model: a built :class:`~deepwhale.model.transformer.CausalLM`.
        stage_idx: ``0 <= stage_idx < n_stages``.
        n_stages: total pipeline stages.

    Returns:
        a :class:`StageModule` whose ``state_dict`` keys are a subset of ``model``'s; the stages
        ``0 .. n_stages - 1`` together hold every key exactly once.

    Raises:
        ValueError: ``stage_idx`` out of range, fewer layers than stages, or tied embeddings
            (``tie_word_embeddings``) with more than one stage: ``lm_head`` and the embedding
            would live on different ranks and their gradients would not be summed.
    """
    if not 0 <= stage_idx < n_stages:
        raise ValueError(f"stage_idx must be in [0, {n_stages}), got {stage_idx}")
    if n_stages > 1 and model.config.tie_word_embeddings:
        raise ValueError(
            "pipeline parallelism does not support tie_word_embeddings: the embedding (first "
            "stage) and lm_head (last stage) would be separate copies on different ranks"
        )
    ranges = stage_layer_ranges(model.config.num_hidden_layers, n_stages)
    return StageModule(model, stage_idx, n_stages, ranges[stage_idx])


class WindowTokenLoss:
    """Pipeline loss: ``sum_t CE(logits_t, labels_t) / denom`` in fp32 over one microbatch.

    With ``denom`` = label tokens (``labels != -100``) of the whole accumulation window, the
    microbatch losses sum to the window's mean token loss (nats) and, with ``scale_grads=False``,
    the pipeline gradient equals the single-process gradient of that mean.

    Call :meth:`window` with the window's labels before every ``schedule.step`` on the rank that
    holds the last stage.

    Attributes:
        denom: the divisor, tokens; 1.0 until :meth:`window` sets it.
    """

    def __init__(self, denom: float = 1.0) -> None:
        self.denom = float(denom)

    def window(self, labels: torch.Tensor) -> int:
        """Set ``denom`` to the label tokens of ``labels`` (the whole window, ``(B, T)``; at least
        1 so an all-padding window gives a zero loss) and return it."""
        n = max(int((labels != IGNORE_INDEX).sum()), 1)
        self.denom = float(n)
        return n

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits (b, T, V)``, ``labels (b, T)`` int64 -> a 0-d fp32 loss."""
        ce = token_cross_entropy_sum(logits, labels)
        return ce / self.denom


def _static_meta(mod: StageModule, b: int, t: int) -> dict[str, torch.Tensor]:
    """``input_args``/``output_args`` meta tensors of one stage for microbatches ``(b, t)``: ids
    ``(b, t)`` int64 or hidden ``(b, t, H)``; hidden or logits ``(b, t, V)``, in the parameters'
    dtype. Activations carry ``requires_grad`` so the receive buffers take gradients."""
    h, v = mod.config.hidden_size, mod.config.vocab_size
    dtype = next(mod.parameters()).dtype

    def act(width: int) -> torch.Tensor:
        return torch.empty(b, t, width, dtype=dtype, device="meta", requires_grad=True)

    ids = torch.empty(b, t, dtype=torch.long, device="meta")
    return {
        "input_args": ids if mod.is_first else act(h),
        "output_args": act(v) if mod.is_last else act(h),
    }


def _pp_group(pp_group):
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh (or a mesh with a ``pp`` dim)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(pp_group, DeviceMesh):
        if pp_group.ndim == 1:
            return pp_group.get_group()
        return pp_group.get_group("pp")
    return pp_group


def build_pipeline(
    model: CausalLM,
    pp_group,
    layout: ParallelLayout,
    device: torch.device | str,
    loss_fn,
    n_microbatches: int | None = None,
    batch_shape: tuple[int, int] | None = None,
    parallelize=None,
):
    """Stages of this rank and the ``torch.distributed.pipelining`` schedule that runs them.

    ``gpipe`` (:class:`~torch.distributed.pipelining.ScheduleGPipe`, Huang et al. 2019) and
    ``1f1b`` (``Schedule1F1B``, Narayanan et al. 2021) put stage ``r`` on pp rank ``r``;
    ``interleaved_1f1b`` (``ScheduleInterleaved1F1B``, Narayanan et al. 2021 §2.2.2) puts stages
    ``r`` and ``r + pp`` on rank ``r`` (2 * pp stages in all). Schedules use
    ``scale_grads=False``: pair them with :class:`WindowTokenLoss`. See :func:`pipeline_step` for
    the calling convention.

    Args:
        model: the full :class:`~deepwhale.model.transformer.CausalLM`, identical on every pp rank
            (same init or checkpoint); only this rank's stages are moved to ``device``.
        pp_group: the pipeline ProcessGroup, or a DeviceMesh (1-D, or with a ``pp`` dimension).
        layout: its ``pp`` must equal the group size; ``pp_schedule`` picks the schedule.
        device: where this rank's stages run.
        loss_fn: ``loss_fn(logits (b, T, V), labels (b, T)) -> 0-d loss``, e.g.
            :class:`WindowTokenLoss` (also used by the forward-only ``schedule.eval``).
        n_microbatches: microbatches per step; None = ``layout.microbatches``.
        batch_shape: ``(B, T)`` of every window fed to ``step``: gives torch the stages' input and
            output shapes up front (static metadata), so no shape-probing forward runs on
            uninitialised tensors. None lets torch infer shapes from the first step (dynamic mode:
            stages after the first run once on empty tensors). Either way the shapes are fixed
            after the first step; feed windows of one ``(B, T)``.
        parallelize: ``fn(stage_module) -> None`` applied to each stage module (on ``device``)
            before it is wrapped in a ``PipelineStage``: the TP / FSDP2 plans of the other mesh
            dimensions. Under sequence parallelism pass ``batch_shape=None`` (the activations
            between stages are then ``(b, T / tp, H)``).

    Returns:
        ``(stage_modules, schedule)``: this rank's :class:`StageModule` list in stage order (one,
        or two for ``interleaved_1f1b``) and the schedule.

    Raises:
        LayoutError: ``layout.pp`` differs from the group size, no microbatch count, or ``B``
            not divisible by it.
        ValueError: no ``loss_fn``, fewer layers than stages or tied embeddings
            (:func:`build_stage_module`).
    """
    import torch.distributed as dist
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    group = _pp_group(pp_group)
    pp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if layout.pp != pp:
        raise LayoutError(f"parallel.pp={layout.pp} but the pipeline group has {pp} ranks")
    n_mb = n_microbatches if n_microbatches is not None else layout.microbatches
    if n_mb is None or n_mb < 1:
        raise LayoutError("pipeline needs n_microbatches >= 1 (or parallel.microbatches)")
    if batch_shape is not None and batch_shape[0] % n_mb:
        raise LayoutError(
            f"a window of {batch_shape[0]} sequences does not split into {n_mb} equal microbatches"
        )
    if loss_fn is None:
        raise ValueError("build_pipeline needs a loss_fn (e.g. WindowTokenLoss())")
    device = torch.device(device)
    looped = layout.pp_schedule == "interleaved_1f1b"
    n_stages = pp * (2 if looped else 1)
    stage_ids = [rank, rank + pp] if looped else [rank]

    modules, stages = [], []
    for s in stage_ids:
        mod = build_stage_module(model, s, n_stages).to(device)
        if parallelize is not None:
            parallelize(mod)
        meta = (
            {} if batch_shape is None else _static_meta(mod, batch_shape[0] // n_mb, batch_shape[1])
        )
        modules.append(mod)
        stages.append(PipelineStage(mod, s, n_stages, device, group=group, **meta))

    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if looped:
        schedule = ScheduleInterleaved1F1B(stages, n_mb, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = kind[layout.pp_schedule](stages[0], n_mb, loss_fn=loss_fn, scale_grads=False)
    return modules, schedule


def pipeline_step(
    schedule,
    stage_modules: Sequence[StageModule],
    input_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    train: bool = True,
) -> torch.Tensor | None:
    """Run one window through the pipeline with torch's calling convention.

    The rank holding the first stage passes ``input_ids`` (``schedule.step(input_ids, ...)``), the
    rank holding the last stage ``target=labels`` and a ``losses`` list; other ranks call
    ``schedule.step()``. ``train=False`` uses ``schedule.eval`` under ``torch.no_grad()``: forward
    only, for validation loss (no gradients are touched). Set the loss's ``denom`` first
    (:meth:`WindowTokenLoss.window`).

    Args:
        schedule, stage_modules: from :func:`build_pipeline`.
        input_ids: ``(B, T)`` int64, needed where a local stage ``is_first``; else ignored.
        labels: ``(B, T)`` int64 (-100 = no loss), needed where a local stage ``is_last``.
        train: forward and backward (gradients accumulate into ``.grad``) or forward only.

    Returns:
        on the rank holding the last stage the detached sum of the microbatch losses (0-d; with
        :class:`WindowTokenLoss` the window's mean token loss, nats), elsewhere None.

    Raises:
        ValueError: ``input_ids`` or ``labels`` missing on the rank that needs them.
    """
    first = any(m.is_first for m in stage_modules)
    last = any(m.is_last for m in stage_modules)
    if first and input_ids is None:
        raise ValueError("the rank holding the first pipeline stage needs input_ids")
    if last and labels is None:
        raise ValueError("the rank holding the last pipeline stage needs labels")
    args = (input_ids,) if first else ()
    losses: list[torch.Tensor] = []
    kwargs = {"target": labels, "losses": losses} if last else {}
    if train:
        schedule.step(*args, **kwargs)
    else:
        with torch.no_grad():
            schedule.eval(*args, **kwargs)
    if not last:
        return None
    return torch.stack([x.detach() for x in losses]).sum()
