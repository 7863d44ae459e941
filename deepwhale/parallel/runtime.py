"""Process groups and the device mesh of one distributed run, started by ``torchrun``.

:func:`preflight` checks the layout against ``WORLD_SIZE`` and the model *before* any process
group exists, so a bad layout exits 2 on every rank at once (nothing can hang waiting for a peer).
:func:`init_runtime` then creates the default process group with an explicit timeout and one
``DeviceMesh`` of dims ``("pp", "dp_replicate", "dp_shard", "tp")``; expert-parallel groups are
cut from the data-parallel ranks of the same ``(pp, tp)`` coordinate.

The timeout bounds how long a rank waits in a collective for a peer that died or hangs; torchrun's
agent also stops the remaining workers as soon as one exits with an error.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from deepwhale.parallel.layout import LayoutError, ParallelLayout, check_layout, describe

log = logging.getLogger(__name__)

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def launched_by_torchrun() -> bool:
    """True when ``torchrun`` (or another launcher setting ``WORLD_SIZE`` and ``RANK``) started
    this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment (``0, 0, 1`` without)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


def model_config_of(model_section):
    """The :class:`~deepwhale.model.config.ModelConfig` a training run will build, without weights.

    Raises:
        LayoutError: ``model.name`` names nothing we can read a config from.
        ConfigError: a malformed ``config.json``.
    """
    from deepwhale.model.config import ModelConfig
    from deepwhale.model.flavours import FLAVOURS, flavour_config

    name = model_section.name
    path = Path(name)
    overrides = {"vocab_size": model_section.vocab_size} if model_section.vocab_size else {}
    if name in FLAVOURS:
        return flavour_config(name, **overrides)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_json_file(path / "config.json")
    if path.is_file() and path.suffix == ".json":
        cfg = ModelConfig.from_json_file(path)
        if model_section.vocab_size:
            cfg.vocab_size = model_section.vocab_size
        return cfg
    return None  # the trainer names the problem itself


def input_length(cfg) -> int | None:
    """Input tokens per sequence of a training config (row length - 1), read from the shard
    manifest for packed shards; None for chat data (padded per batch) or when unknown."""
    import json

    data = cfg.data
    if data.format == "chat":
        return None
    path = Path(data.path) if data.path else None
    if path is not None and path.is_dir():
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            return int(manifest["seq_len"]) - 1
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return data.seq_len - 1


def preflight(cfg, world_size: int) -> ParallelLayout:
    """Resolve ``cfg.parallel`` for ``world_size`` processes and check it against the model.

    Runs identically on every rank, before any process group is created.

    Returns:
        The resolved layout (``dp`` filled in).

    Raises:
        LayoutError: the product of the degrees differs from the world size, a degree the model
            cannot be split by, or a combination that is not supported (LoRA with model
            parallelism, gradient compression beyond DDP, PP with checkpointing and compile
            on a MoE model).
    """
    layout = cfg.parallel.resolved(world_size)
    model_config = model_config_of(cfg.model)
    if model_config is not None:
        check_layout(layout, model_config, input_length(cfg))
    if cfg.lora.enabled and (
        layout.tp > 1 or layout.pp > 1 or layout.ep > 1 or layout.dp_shard > 1
    ):
        raise LayoutError(
            f"lora.enabled with parallel {describe(layout)} is not supported: LoRA trains with data "
            "parallelism (dp) only"
        )
    if layout.microbatches is not None and layout.pp == 1:
        raise LayoutError("parallel.microbatches applies to pipeline parallelism (pp > 1) only")
    if layout.pp > 1:
        m = layout.microbatches or cfg.train.grad_accum
        window = cfg.train.micro_batch_size * cfg.train.grad_accum
        if window % m:
            raise LayoutError(
                f"parallel.microbatches={m} must divide the sequences of a step per data-parallel "
                f"rank (train.micro_batch_size x train.grad_accum = {window})"
            )
    t = cfg.train
    moe = model_config is not None and bool(model_config.n_routed_experts)
    if layout.pp > 1 and moe and t.compile and t.activation_checkpointing != "none":
        # compiled checkpoint regions replay without the recompute marker (ac_compile), and
        # under PP the MoE layers' balance statistics are recorded inside them
        raise LayoutError(
            "parallel.pp > 1 with both train.activation_checkpointing and train.compile is not "
            "supported on a MoE model: the recomputed forward would count the router statistics "
            "twice; turn one of them off"
        )
    gc = layout.grad_compression
    if gc.method != "none":
        others = [
            f"{n}={getattr(layout, n)}"
            for n in ("dp_shard", "tp", "pp", "ep")
            if getattr(layout, n) > 1
        ]
        if others:
            raise LayoutError(
                f"parallel.grad_compression.method={gc.method} works with DDP (dp) only; it cannot "
                f"be combined with {', '.join(others)} (FSDP2 and model-parallel gradients are "
                "reduced inside their plans, where no DDP communication hook runs)"
            )
    return layout


@dataclass
class Runtime:
    """One rank's view of a distributed run.

    Attributes:
        layout: the resolved layout.
        rank, local_rank, world_size: from torchrun.
        device: ``cuda:LOCAL_RANK`` with NCCL, else ``cpu`` with gloo.
        backend: ``nccl`` or ``gloo``.
        mesh: the ``("pp", "dp_replicate", "dp_shard", "tp")`` DeviceMesh.
        timeout_s: the process-group timeout, seconds.
        ep_group / ep_outer_group: expert-parallel groups (None when ``ep == 1``): ranks that
            split the experts, and ranks holding the same experts.
        init_started: when :func:`init_runtime` began, seconds since the epoch.
        init_s: how long process-group init and the device mesh took, seconds.
    """

    layout: ParallelLayout
    rank: int
    local_rank: int
    world_size: int
    device: object
    backend: str
    mesh: object
    timeout_s: float
    ep_group: object = None
    ep_outer_group: object = None
    init_started: float = 0.0
    init_s: float = 0.0
    _dp_mesh: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes shared files."""
        return self.rank == 0

    def sub(self, *names: str):
        """The sub-mesh of these dims (e.g. ``sub("tp")``)."""
        return self.mesh[names if len(names) > 1 else names[0]]

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    @property
    def pp_mesh(self):
        return self.mesh["pp"]

    @property
    def dp_mesh(self):
        """The data-parallel ranks flattened into one dim ``dp`` (all of them hold different
        sequences)."""
        if self._dp_mesh is None:
            self._dp_mesh = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return self._dp_mesh

    @property
    def dp_group(self):
        return self.dp_mesh.get_group()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (which sequences it takes)."""
        return self.dp_mesh.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def tp_rank(self) -> int:
        return self.mesh.get_local_rank("tp")

    def describe(self) -> str:
        """``dp=2,tp=2 on 4 processes (gloo, timeout 300 s)``."""
        return (
            f"{describe(self.layout)} on {self.world_size} processes ({self.backend}, "
            f"process-group timeout {self.timeout_s:g} s)"
        )


def init_runtime(layout: ParallelLayout, device_name: str = "auto") -> Runtime:
    """Create the default process group and the device mesh for a resolved ``layout``.

    Args:
        layout: from :func:`preflight`.
        device_name: ``train.device``: ``auto`` (CUDA + NCCL when present), ``cpu`` or ``cuda``.

    Raises:
        LayoutError: CUDA asked for where there is none.
    """
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    started = time.time()
    rank, local_rank, world = env_world()
    use_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available()
    )
    if use_cuda and not torch.cuda.is_available():
        raise LayoutError(f"train.device={device_name!r} asked for, but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=layout.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    shape = (layout.pp, layout.dp, layout.dp_shard, layout.tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    rt = Runtime(layout, rank, local_rank, world, device, backend, mesh, layout.timeout_s)
    if layout.ep > 1:
        rt.ep_group, rt.ep_outer_group = _expert_groups(mesh, layout)
    rt.init_started, rt.init_s = started, time.time() - started
    return rt


def _expert_groups(mesh, layout: ParallelLayout):
    """EP groups: consecutive data-parallel ranks ``[g*ep, (g+1)*ep)`` of each ``(pp, tp)``
    coordinate; outer groups: the data-parallel ranks with the same position in their EP group
    (they hold the same experts). Every rank creates every group, in the same order."""
    import torch.distributed as dist

    grid = mesh.mesh.reshape(layout.pp, layout.dp_degree, layout.tp)  # global ranks
    me = dist.get_rank()
    ep_group = outer_group = None
    for p in range(layout.pp):
        for t in range(layout.tp):
            column = [int(r) for r in grid[p, :, t]]
            for g in range(0, len(column), layout.ep):
                ranks = column[g : g + layout.ep]
                grp = dist.new_group(ranks)
                if me in ranks:
                    ep_group = grp
            for j in range(layout.ep):
                ranks = column[j :: layout.ep]
                grp = dist.new_group(ranks)
                if me in ranks:
                    outer_group = grp
    return ep_group, outer_group


def shutdown() -> None:
    """Destroy the default process group if one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
