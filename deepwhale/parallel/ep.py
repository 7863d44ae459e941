"""Expert parallelism for DeepSeekMoE, applied from outside the single-device model.

The routed experts of every :class:`~deepwhale.model.moe.MoE` are split over the ranks of an
expert-parallel (EP) group (GShard, Lepikhin et al. 2020, arXiv:2006.16668): rank ``r`` of ``P``
keeps experts ``[r * E / P, (r + 1) * E / P)``. EP ranks are data-parallel ranks, so each holds
*different* tokens (see :mod:`deepwhale.parallel.layout`). The router (:class:`Gate`) and the
shared experts stay replicated and run on the local tokens; each ``(token, expert)`` pair is then
sent to the expert's owner with an all-to-all, the owner runs its experts, a second all-to-all
brings the outputs back, and they are combined with the gate weights (DeepSeek-V3 report,
arXiv:2412.19437, §3.2: all-to-all dispatch and combine).

The math is the single-device :meth:`MoE.forward`'s, step for step (fp32 gate weights cast to the
activations' dtype, one ``index_add_`` in expert order), so an EP run matches a single-process run
on the concatenated batch within fp32 rounding, and its gradients too: a local expert's gradient
holds the contributions of every EP rank's tokens, and the replicated parameters' gradients summed
over the group (what DDP/FSDP do anyway) equal the single-process ones.

Usage::

    model = CausalLM(config)  # load the full weights first
    apply_expert_parallel(model, ep_group)  # frees the other ranks' experts
    ...
    full = full_state_dict(model)  # every expert again, on every rank, for saving

Parameter names do not change: kept experts stay ``...mlp.experts.{global_j}...`` (an
:class:`nn.ModuleDict` keyed by the global index replaces the list), so checkpoints still map to
HF keys. Each rank's state dict holds only its own experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from deepwhale.model.moe import MoE


def local_expert_range(n_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global ids of the routed experts that EP rank ``ep_rank`` of ``ep_size`` owns.

    Returns:
        ``range(ep_rank * E / P, (ep_rank + 1) * E / P)`` with ``E = n_experts``, ``P = ep_size``
        (contiguous blocks, as in GShard's expert sharding).

    Raises:
        ValueError: ``ep_size < 1``, ``ep_rank`` outside ``[0, ep_size)``, or ``ep_size`` not
            dividing ``n_experts``.
    """
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")
    if n_experts % ep_size:
        raise ValueError(
            f"expert parallelism of degree {ep_size} must divide the routed experts ({n_experts})"
        )
    per = n_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` on rows with uneven splits; its backward is the reverse
    all-to-all (the gradient of row ``i`` goes back to the rank that sent row ``i``)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None
) -> torch.Tensor:
    """Autograd-aware all-to-all of rows with uneven split sizes.

    Args:
        x: ``(sum(in_splits), ...)``; rows ``[sum(in_splits[:s]), sum(in_splits[:s + 1]))`` go to
            rank ``s`` of ``group``.
        out_splits: rows received from each rank (what those ranks' ``in_splits`` say for us).
        in_splits: rows sent to each rank.
        group: the process group (None = the default group).

    Returns:
        ``(sum(out_splits), ...)``: the rows received, in rank order. The backward pass runs the
        reverse all-to-all, so every rank of the group must run it (every rank must backpropagate
        through the output; zero rows are fine).

    Raises:
        RuntimeError: from the backend, when the splits disagree across ranks or a peer times out.
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class EPMoE(MoE):
    """A :class:`~deepwhale.model.moe.MoE` whose routed experts are split over an EP group.

    Not built directly: :func:`apply_expert_parallel` turns an ``MoE`` into one in place (the
    instance's class changes, as FSDP2's ``fully_shard`` does; the ``MoE`` class is untouched).

    Attributes:
        experts: ``nn.ModuleDict`` of the local experts keyed by their global id (``"4"``), so
            parameter names are the single-device ones.
        ep_group: the process group; ``ep_size``, ``ep_rank`` its size and this rank's index.
        expert_range: the global ids held here (:func:`local_expert_range`).

    Shapes: ``(B, T, H) -> (B, T, H)``, like ``MoE``; every rank of the group must call forward
    together (and backward, in training) for every EP layer, since each call runs collectives.
    """

    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    expert_range: range

    def extra_repr(self) -> str:
        r = self.expert_range
        return f"ep_rank={self.ep_rank}/{self.ep_size}, experts=[{r.start}, {r.stop})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        weights, indices, _ = self.gate(flat)  # (N, k) fp32, (N, k)
        k = indices.shape[-1]
        p, e_total = self.ep_size, self.gate.n_experts
        e_local = e_total // p
        expert_of = indices.flatten()  # (N*k,) pair t*k+slot -> expert
        # pairs sorted by expert, then token (as the single-device loop visits them); destination
        # ranks own contiguous expert blocks, so this also sorts by destination
        order = torch.argsort(expert_of, stable=True)  # (N*k,)
        token_of = order // k  # (N*k,)
        # 1) counts: send_counts[e] pairs for expert e; the block of rank s goes to rank s
        send_counts = torch.bincount(expert_of, minlength=e_total)  # (E,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        recv_grid = recv_counts.view(p, e_local)  # (P, E/P): from source s for local expert j
        send_splits = send_counts.view(p, e_local).sum(dim=1).tolist()  # host sync
        recv_splits = recv_grid.sum(dim=1).tolist()
        # 2) dispatch: one row per (token, expert) pair, source-major / expert-minor on arrival
        routed = all_to_all_rows(flat[token_of], recv_splits, send_splits, self.ep_group)  # (M, H)
        # 3) local experts: group the arrived rows by local expert (stable: source order kept)
        local_of = torch.arange(e_local, device=flat.device).repeat(p)  # (P*E/P,)
        local_of = local_of.repeat_interleave(recv_grid.flatten())  # (M,)
        by_expert = torch.argsort(local_of, stable=True)  # (M,)
        per_expert = recv_grid.sum(dim=0).tolist()
        outs = []
        for j, rows in zip(self.expert_range, routed[by_expert].split(per_expert), strict=True):
            # an expert without tokens is skipped (its grad stays None, as on one device); the
            # empty slice keeps the all-to-all in the graph so every rank runs its backward
            outs.append(self.experts[str(j)](rows) if rows.shape[0] else rows)
        inverse = torch.empty_like(by_expert)
        inverse[by_expert] = torch.arange(by_expert.numel(), device=flat.device)
        done = torch.cat(outs)[inverse]  # (M, H) back in arrival order
        # 4) combine: outputs return to the sender in the order they left
        back = all_to_all_rows(done, send_splits, recv_splits, self.ep_group)  # (N*k, H)
        w = weights.flatten()[order].to(flat.dtype)  # (N*k,)
        out = torch.zeros_like(flat).index_add_(0, token_of, back * w[:, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup | None = None) -> None:
    """Split the routed experts of every :class:`~deepwhale.model.moe.MoE` in ``model`` over
    ``ep_group``, in place.

    Rank ``r`` of ``P`` keeps experts :func:`local_expert_range` ``(E, P, r)`` (same parameter
    names, see :class:`EPMoE`) and drops the others, which frees them unless referenced elsewhere;
    the gate and shared experts stay. Load the full weights before (or load each rank's share of a
    checkpoint after: the state dict keys are the single-device ones, minus the other ranks'
    experts). Apply after tensor parallelism and before activation checkpointing, compile and
    FSDP (torchtitan's order). References: DeepSeek-V3 report (arXiv:2412.19437) §3.2; GShard
    (Lepikhin et al. 2020).

    Args:
        model: any module holding ``MoE`` layers (a :class:`CausalLM`, maybe wrapped).
        ep_group: the expert-parallel group: ranks holding different tokens; None = the default
            group.

    Raises:
        ValueError: no ``MoE`` layer in ``model``, expert parallelism already applied, or a group
            size that does not divide a layer's routed experts.
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs torch.distributed initialised")
    group = ep_group if ep_group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("apply_expert_parallel: the model has no MoE layers (a dense model)")
    if any(isinstance(m, EPMoE) for m in layers):
        raise ValueError("apply_expert_parallel: expert parallelism is already applied")
    spans = [local_expert_range(len(m.experts), size, rank) for m in layers]  # check all first
    for m, span in zip(layers, spans, strict=True):
        m.experts = nn.ModuleDict({str(j): m.experts[j] for j in span})
        m.__class__ = EPMoE
        m.ep_group, m.ep_size, m.ep_rank, m.expert_range = group, size, rank, span


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of local routed experts under expert parallelism.

    Their gradients are already complete over the EP group (the all-to-all backward brings every
    rank's contribution) and must not be summed over it; the other parameters are replicated and
    their gradients are summed over the data-parallel ranks, EP ranks included.
    """
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, EPMoE):
            names.update(f"{prefix}.experts.{n}" for n, _ in m.experts.named_parameters())
    return names


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict of an expert-parallel model, on every rank of each EP group.

    Every rank gathers the other ranks' experts (``dist.all_gather`` of each expert tensor stacked
    over the local experts, ``(E/P, ...)`` per rank, so the group's ranks must call it together).
    Keys and their order are those of the model before :func:`apply_expert_parallel`.

    Returns:
        ``{name: tensor}``; expert tensors are new detached copies, the rest are
        ``model.state_dict()``'s.
    """
    local = model.state_dict()
    gathered: dict[str, dict[str, torch.Tensor]] = {}  # MoE prefix -> full expert tensors
    for prefix, m in model.named_modules():
        if not isinstance(m, EPMoE):
            continue
        full = {}
        states = [m.experts[str(j)].state_dict() for j in m.expert_range]
        for name in states[0]:
            stack = torch.stack([sd[name] for sd in states])  # (E/P, ...)
            parts = [torch.empty_like(stack) for _ in range(m.ep_size)]
            dist.all_gather(parts, stack.contiguous(), group=m.ep_group)
            per = len(m.expert_range)
            for s, part in enumerate(parts):
                for i in range(per):
                    full[f"experts.{s * per + i}.{name}"] = part[i]
        gathered[f"{prefix}." if prefix else ""] = dict(sorted(full.items(), key=_expert_key))
    out: dict[str, torch.Tensor] = {}
    emitted = set()
    for key, value in local.items():
        owner = next((p for p in gathered if key.startswith(p + "experts.")), None)
        if owner is None:
            out[key] = value
        elif owner not in emitted:  # the layer's experts, all of them, where its first one was
            emitted.add(owner)
            out.update({owner + k: v for k, v in gathered[owner].items()})
    return out


def _expert_key(item: tuple[str, torch.Tensor]) -> int:
    """The global expert id of ``("experts.{j}.{param}", tensor)``; sorting by it is stable, so
    the parameter order within an expert is kept."""
    return int(item[0].split(".")[1])
