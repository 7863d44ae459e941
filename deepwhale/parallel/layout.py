"""Parallel layouts: how many ways a run splits over data, tensor, pipeline and expert parallelism.

Pure Python (no torch): the config section of a run, the ``--parallel dp=2,tp=2,pp=2`` parser and
the checks a layout must pass against the world size and the model before any process group is
touched. The trainer, the planner (:mod:`deepwhale.parallel.planner`) and the benchmarks share it.

Degrees (the product ``dp * dp_shard * tp * pp`` is the world size, the number of processes):

* ``dp`` — data-parallel replicas. Alone it is DDP; together with ``dp_shard`` it is the replicate
  dimension of HSDP (hybrid sharded data parallel).
* ``dp_shard`` — FSDP2 ``fully_shard`` degree (ZeRO-3 style sharding of parameters, gradients and
  optimizer state).
* ``tp`` — tensor parallelism (Megatron-LM, Shoeybi et al. 2019): column/row-wise linear layers,
  vocabulary-parallel embedding and ``lm_head`` with loss parallel, optional sequence parallelism
  for the norms (Korthikanti et al. 2022).
* ``pp`` — pipeline stages cut by layer count (GPipe, Huang et al. 2019; 1F1B, Narayanan et al.
  2021).
* ``ep`` — expert parallelism for DeepSeekMoE (DeepSeek-V3 report §3.2): the routed experts are
  split over ``ep`` ranks *borrowed from the data-parallel ranks* (``ep`` divides
  ``dp * dp_shard``), with all-to-all token dispatch and combine; it adds no processes.

A degree left out of ``--parallel`` is 1, except ``dp``: when the others do not fill the world,
``dp`` takes the rest (``torchrun --nproc-per-node 4 ... --parallel tp=2`` runs ``dp=2,tp=2``).

Mesh dimensions, outermost first: ``pp, dp_replicate, dp_shard, tp`` (torchtitan's order), so TP
peers are neighbouring ranks (one node) and pipeline stages the farthest apart.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
COMPRESSION_METHODS = ("none", "topk", "powersgd")
TOPK_SCOPES = ("tensor", "bucket")
DEGREES = ("dp", "dp_shard", "tp", "pp", "ep")


class LayoutError(ValueError):
    """A parallel layout that cannot run here: bad syntax, a product that differs from the world
    size, or a degree the model cannot be split by. The message names the constraint."""


@dataclass
class GradCompression:
    """Data-parallel gradient compression (see :mod:`deepwhale.parallel.compression`).

    Attributes:
        method: ``none`` (dense all-reduce), ``topk`` (Top-k sparsification with error feedback,
            Deep Gradient Compression, Lin et al., ICLR 2018) or ``powersgd`` (torch's built-in
            ``powerSGD_hook``, Vogels et al. 2019, as the comparator).
        ratio: share of each gradient bucket's entries that Top-k sends, in (0, 1].
        warmup_steps: optimizer steps over which Top-k's density decays exponentially from dense
            to ``ratio`` (DGC's sparsity warm-up); 0 starts sparse.
        momentum_correction: accumulate the residual as velocity (DGC's momentum correction)
            instead of plain gradients.
        momentum: the momentum factor of the correction.
        powersgd_rank: matrix rank of PowerSGD's low-rank approximation.
        topk_scope: what Top-k ranks entries within: ``tensor`` (default; each parameter's
            gradient sends ``ceil(ratio * numel)`` entries, DGC Algorithm 1's per-layer
            selection, independent of DDP's bucket layout, so a resumed run continues bit for
            bit) or ``bucket`` (one ``ceil(ratio * N)`` over each DDP bucket; it depends on the
            layout, which DDP rebuilds after the first iteration of every run, resumed ones too).
        gap_aware_adam: take AdamW's step with a second moment that counts the steps each
            coordinate's gradient was held back by Top-k
            (:func:`deepwhale.parallel.compression.adamw_step_gap_aware`). Plain AdamW adds a
            held-back coordinate's lumped ``T * g`` squared once, so it moves about ``sqrt(T)``
            times less than under dense AdamW; this restores the dense step size. Top-k only.
        local_grad_clip: DGC's local gradient clipping (Lin et al. 2018, §3.2): before adding
            its gradient to the residual, each rank scales its whole local gradient (all
            buckets) to an L2 norm of at most ``local_grad_clip / sqrt(W)``; 0 (default) = off.
            Top-k only.
    """

    method: str = "none"
    ratio: float = 0.01
    warmup_steps: int = 50
    momentum_correction: bool = True
    momentum: float = 0.9
    powersgd_rank: int = 4
    topk_scope: str = "tensor"
    gap_aware_adam: bool = False
    local_grad_clip: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in COMPRESSION_METHODS:
            raise LayoutError(
                f"parallel.grad_compression.method: {self.method!r} is not one of "
                f"{', '.join(COMPRESSION_METHODS)}"
            )
        if not 0 < self.ratio <= 1:
            raise LayoutError(
                f"parallel.grad_compression.ratio: must be in (0, 1], got {self.ratio}"
            )
        if self.warmup_steps < 0:
            raise LayoutError("parallel.grad_compression.warmup_steps: must be >= 0")
        if not 0 <= self.momentum < 1:
            raise LayoutError("parallel.grad_compression.momentum: must be in [0, 1)")
        if self.powersgd_rank < 1:
            raise LayoutError("parallel.grad_compression.powersgd_rank: must be >= 1")
        if self.topk_scope not in TOPK_SCOPES:
            raise LayoutError(
                f"parallel.grad_compression.topk_scope: {self.topk_scope!r} is not one of "
                f"{', '.join(TOPK_SCOPES)}"
            )
        if self.gap_aware_adam and self.method != "topk":
            raise LayoutError(
                "parallel.grad_compression.gap_aware_adam: only with method topk, got "
                f"{self.method}"
            )
        if not (self.local_grad_clip >= 0 and math.isfinite(self.local_grad_clip)):
            raise LayoutError(
                "parallel.grad_compression.local_grad_clip: must be a finite number >= 0, got "
                f"{self.local_grad_clip}"
            )
        if self.local_grad_clip and self.method != "topk":
            raise LayoutError(
                "parallel.grad_compression.local_grad_clip: only with method topk, got "
                f"{self.method}"
            )


@dataclass
class ParallelLayout:
    """The ``parallel:`` section of a training config.

    Attributes:
        dp: data-parallel replicas (DDP, or HSDP's replicate dimension with ``dp_shard``); None =
            whatever the other degrees leave of the world size.
        dp_shard: FSDP2 shard degree (1 = no FSDP).
        tp: tensor-parallel degree.
        pp: pipeline stages.
        ep: expert-parallel degree, borrowed from the data-parallel ranks (divides
            ``dp * dp_shard``).
        pp_schedule: ``gpipe``, ``1f1b`` or ``interleaved_1f1b`` (two stages per rank).
        microbatches: pipeline microbatches per optimizer step; None = ``train.grad_accum``.
            Under ``pp`` the accumulation window is fed to the schedule as one batch of
            ``micro_batch_size * grad_accum`` sequences split into this many microbatches.
        sequence_parallel: under ``tp``, shard the norms' activations along the sequence
            (Korthikanti et al. 2022); the input length must then be divisible by ``tp``.
        timeout_s: process-group timeout, seconds: a rank that waits longer on a collective (a
            peer died or hangs) fails instead of hanging.
        grad_compression: data-parallel gradient compression.
    """

    dp: int | None = None
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_schedule: str = "1f1b"
    microbatches: int | None = None
    sequence_parallel: bool = True
    timeout_s: float = 300.0
    grad_compression: GradCompression = field(default_factory=GradCompression)

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LayoutError(f"parallel.{name}: must be >= 1, got {value}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise LayoutError(
                f"parallel.pp_schedule: {self.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}"
            )
        if self.microbatches is not None and self.microbatches < 1:
            raise LayoutError(f"parallel.microbatches: must be >= 1, got {self.microbatches}")
        if self.timeout_s <= 0:
            raise LayoutError(f"parallel.timeout_s: must be > 0, got {self.timeout_s}")

    # ------------------------------------------------------------------ derived
    @property
    def fixed_size(self) -> int:
        """Processes the layout needs with ``dp`` counted as 1 when unset."""
        return (self.dp or 1) * self.dp_shard * self.tp * self.pp

    def resolved(self, world_size: int) -> ParallelLayout:
        """A copy with ``dp`` filled in for ``world_size`` processes.

        Raises:
            LayoutError: the degrees' product differs from (or does not divide) the world size.
        """
        rest = self.dp_shard * self.tp * self.pp
        dp = self.dp
        if dp is None:
            if world_size % rest:
                raise LayoutError(
                    f"parallel layout dp_shard={self.dp_shard} x tp={self.tp} x pp={self.pp} = "
                    f"{rest} does not divide the world size {world_size} (processes started by "
                    "torchrun); choose degrees whose product divides it"
                )
            dp = world_size // rest
        if dp * rest != world_size:
            raise LayoutError(
                f"parallel layout {describe(dataclasses.replace(self, dp=dp))} needs "
                f"{dp * rest} processes but the world size is {world_size} (torchrun "
                "--nproc-per-node x --nnodes); the product dp x dp_shard x tp x pp must equal it"
            )
        return dataclasses.replace(self, dp=dp)

    @property
    def dp_degree(self) -> int:
        """All data-parallel ranks: ``dp * dp_shard`` (each holds different sequences)."""
        return (self.dp or 1) * self.dp_shard

    @property
    def world_size(self) -> int:
        """``dp * dp_shard * tp * pp`` (``dp`` resolved)."""
        return self.fixed_size

    @property
    def pp_microbatches(self) -> int | None:
        """Pipeline microbatches (None: the trainer's ``grad_accum``)."""
        return self.microbatches

    def is_parallel(self) -> bool:
        """True when any degree is above 1."""
        return self.fixed_size > 1 or self.ep > 1


def describe(layout: ParallelLayout) -> str:
    """``dp=2,tp=2,pp=2``-style text of the degrees above 1 (``single process`` for none)."""
    parts = [f"{n}={getattr(layout, n)}" for n in DEGREES if (getattr(layout, n) or 1) > 1]
    return ",".join(parts) or "single process"


def parse_layout(text: str) -> dict[str, int]:
    """Parse ``dp=2,tp=2,pp=2`` (commas or spaces between items) into
    ``{"dp": 2, "tp": 2, "pp": 2}``.

    Raises:
        LayoutError: an unknown degree name, a repeated one or a value that is not a positive
            integer (the message lists the valid names).
    """
    out: dict[str, int] = {}
    for item in text.replace(" ", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise LayoutError(f"--parallel: {item!r} must look like name=N ({', '.join(DEGREES)})")
        if name not in DEGREES:
            raise LayoutError(
                f"--parallel: unknown degree {name!r}; valid ones: {', '.join(DEGREES)}"
            )
        if name in out:
            raise LayoutError(f"--parallel: {name} given twice")
        try:
            n = int(value)
        except ValueError:
            raise LayoutError(f"--parallel: {name}={value!r} is not an integer") from None
        if n < 1:
            raise LayoutError(f"--parallel: {name} must be >= 1, got {n}")
        out[name] = n
    if not out:
        raise LayoutError(f"--parallel: no degrees in {text!r} (e.g. dp=2,tp=2,pp=2)")
    return out


def check_layout(layout: ParallelLayout, model_config, seq_len: int | None = None) -> None:
    """Check that the model splits the way ``layout`` asks (``dp`` already resolved).

    Args:
        layout: a resolved layout.
        model_config: the :class:`~deepwhale.model.config.ModelConfig` to train.
        seq_len: input tokens per sequence (the packed row length minus one), for the sequence
            parallel check; None skips it.

    Raises:
        LayoutError: ``tp`` that does not divide the attention heads, key/value heads, MLP widths
            or vocabulary; ``pp`` above the layer count; ``ep`` that does not divide the routed
            experts or the data-parallel degree; ``ep`` on a dense model; a sequence length not
            divisible by ``tp`` under sequence parallelism; tied embeddings under ``tp`` or
            ``pp``.
    """
    c = model_config
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    if tp > 1:
        checks = [("num_attention_heads", c.num_attention_heads)]
        if not c.is_mla:
            checks.append(("num_key_value_heads", c.num_key_value_heads))
        checks.append(("intermediate_size", c.intermediate_size))
        checks.append(("vocab_size", c.vocab_size))
        if c.n_routed_experts and c.n_shared_experts:
            checks.append(
                (
                    "moe_intermediate_size * n_shared_experts",
                    c.moe_intermediate_size * c.n_shared_experts,
                )
            )
        for name, value in checks:
            if value % tp:
                raise LayoutError(
                    f"parallel.tp={tp} must divide the model's {name} ({value}); choose a tp "
                    f"that divides it"
                )
        if layout.sequence_parallel and seq_len is not None and seq_len % tp:
            raise LayoutError(
                f"parallel.tp={tp} with sequence_parallel needs the input length divisible by tp, "
                f"got {seq_len} tokens per sequence (data.seq_len {seq_len + 1} - 1); change "
                "data.seq_len or set parallel.sequence_parallel=false"
            )
        if c.tie_word_embeddings:
            raise LayoutError(
                "parallel.tp > 1 with tie_word_embeddings is not supported (the vocabulary-parallel "
                "embedding and lm_head would stop sharing their matrix); train with tp=1"
            )
    if pp > 1:
        n_layers = c.num_hidden_layers
        stages = pp * (2 if layout.pp_schedule == "interleaved_1f1b" else 1)
        if stages > n_layers:
            raise LayoutError(
                f"parallel.pp={pp} ({stages} stages with {layout.pp_schedule}) is more than the "
                f"model's {n_layers} layers (num_hidden_layers); use at most pp={n_layers}"
            )
        if c.tie_word_embeddings:
            raise LayoutError(
                "parallel.pp > 1 with tie_word_embeddings is not supported (the embedding and "
                "lm_head live on different stages); train with pp=1"
            )
    if ep > 1:
        if not c.n_routed_experts:
            raise LayoutError(
                f"parallel.ep={ep} needs a MoE model, but {c.model_type} has no routed experts"
            )
        if c.n_routed_experts % ep:
            raise LayoutError(
                f"parallel.ep={ep} must divide the model's n_routed_experts ({c.n_routed_experts})"
            )
        if layout.dp_degree % ep:
            raise LayoutError(
                f"parallel.ep={ep} borrows data-parallel ranks and must divide dp x dp_shard "
                f"({layout.dp_degree})"
            )
