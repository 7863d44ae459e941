"""``deepwhale plan``: rank parallel layouts for a model on a cluster (no torch, no GPU)."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def plan(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Flavour (debug-v3...), release (deepseek-v3-671b, deepseek-v2-236b, "
            "deepseek-llm-7b, deepseek-llm-67b), a folder with config.json or a config.json.",
        ),
    ],
    gpus: Annotated[str, typer.Option(help="GPUs in all (the world size).")],
    gpu_mem: Annotated[str, typer.Option(help="Memory per GPU: 80GB, 80GiB, 141GB.")] = "80GB",
    gpu_tflops: Annotated[
        float, typer.Option(help="Peak dense bf16 TFLOP/s per GPU (H100/H800 SXM: 989).")
    ] = 989.0,
    seq_len: Annotated[str, typer.Option(help="Tokens per sequence: 4096, 4k.")] = "4096",
    global_batch_tokens: Annotated[
        str, typer.Option(help="Tokens per optimizer step: 4M, 63M, 1.5k (powers of 1000).")
    ] = "4M",
    nodes: Annotated[str, typer.Option(help="Nodes the GPUs are spread over.")] = "1",
    inter_node_gbps: Annotated[
        float, typer.Option(help="Per-GPU bandwidth to other nodes, Gb/s (400 Gb/s IB NIC).")
    ] = 400.0,
    intra_node_gbps: Annotated[
        float,
        typer.Option(help="Per-GPU one-direction bandwidth inside a node, Gb/s (H100 NVLink)."),
    ] = 3600.0,
    efficiency: Annotated[
        float, typer.Option(help="Share of peak FLOP/s the matrix products reach.")
    ] = 0.5,
    activation_checkpointing: Annotated[
        str, typer.Option(help="auto (only when needed to fit), none or full.")
    ] = "auto",
    top: Annotated[int, typer.Option(help="Rows to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Rank parallel layouts (dp, dp_shard/FSDP, tp, pp, ep) by predicted tokens/s per GPU.

    An analytic model (docs/planner.md): bf16 parameters and gradients, AdamW with an fp32
    master copy (2 + 2 + 12 bytes per parameter), Korthikanti et al. 2022 activations, Narayanan
    et al. 2021 pipeline bubbles, ring collectives. Bad input prints one error line, exit 2.
    """
    from deepwhale.model.config import ConfigError
    from deepwhale.parallel.planner import (
        GIB,
        PlanError,
        load_model_config,
        parse_count,
        parse_size,
    )
    from deepwhale.parallel.planner import plan as run_plan

    try:
        n_gpus = _positive_int("--gpus", gpus)
        n_nodes = _positive_int("--nodes", nodes)
        if top < 1:
            raise PlanError(f"--top must be >= 1, got {top}")
        mem = _parsed("--gpu-mem", parse_size, gpu_mem)
        seq = _parsed("--seq-len", parse_count, seq_len)
        batch = _parsed("--global-batch-tokens", parse_count, global_batch_tokens)
        config, label = load_model_config(model)
        ranked = run_plan(
            config,
            n_gpus,
            mem,
            gpu_tflops,
            seq,
            batch,
            nodes=n_nodes,
            inter_node_gbps=inter_node_gbps,
            intra_node_gbps=intra_node_gbps,
            activation_checkpointing=activation_checkpointing,
            compute_efficiency=efficiency,
        )
    except (PlanError, ConfigError, OSError) as e:
        _fail(str(e))
    counts = ranked[0].estimate.params
    assumptions = {
        "gpus": n_gpus,
        "nodes": n_nodes,
        "gpu_mem_bytes": mem,
        "gpu_tflops": gpu_tflops,
        "compute_efficiency": efficiency,
        "seq_len": seq,
        "global_batch_tokens_requested": batch,
        "inter_node_gbps": inter_node_gbps,
        "intra_node_gbps": intra_node_gbps,
        "bytes_per_param": {"params": 2, "grads": 2, "adamw_master_m_v": 12},
        "activation_bytes": 2,
        "usable_mem_fraction": 0.9,
    }
    rows = ranked[:top]
    if as_json:
        out = {
            "model": label,
            "params": dataclasses.asdict(counts),
            "assumptions": assumptions,
            "candidates": [_candidate_json(x) for x in rows],
        }
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(
        f"[bold]{label}[/]: {counts.total / 1e9:.3g}B parameters, {counts.active / 1e9:.3g}B "
        f"active per token; {n_gpus} GPUs on {n_nodes} node(s), {mem / GIB:.1f} GiB each, "
        f"{gpu_tflops:g} TFLOP/s x {efficiency:g}; seq {seq}, "
        f"{len(ranked)} layouts fit (bf16 params/grads, fp32 AdamW master + m + v)",
        highlight=False,
    )
    table = Table(
        "#", "layout", "mbs", "m", "AC", "params", "grads", "optim", "fsdp", "act", "total",
        "bubble", "tp GB", "pp GB", "ep GB", "dp GB", "exposed comm s", "step s", "tok/s/GPU",
        "MFU",
    )  # fmt: skip
    for i, x in enumerate(rows, 1):
        e, mm = x.estimate, x.estimate.memory
        dp_gb = (e.comm_bytes("dp", "wire") + e.comm_bytes("dp_shard", "wire")) / 1e9
        table.add_row(
            str(i),
            x.name,
            str(e.micro_batch_size),
            str(e.microbatches),
            e.activation_checkpointing,
            _gib(mm.params),
            _gib(mm.grads),
            _gib(mm.optimizer),
            _gib(mm.fsdp_buffers),
            _gib(mm.activations),
            _gib(mm.total),
            f"{e.bubble_fraction:.1%}",
            f"{e.comm_bytes('tp', 'wire') / 1e9:.0f}",
            f"{e.comm_bytes('pp', 'wire') / 1e9:.1f}",
            f"{e.comm_bytes('ep', 'wire') / 1e9:.0f}",
            f"{dp_gb:.0f}",
            f"{sum(e.comm_s.values()):.2f}",
            f"{e.step_s:.2f}",
            f"{e.tokens_per_s_per_gpu:,.0f}",
            f"{e.mfu:.1%}",
        )
    console.print(table)
    console.print(
        "memory in GiB per GPU (heaviest pipeline rank); comm in GB sent per GPU per step "
        "(wire bytes); see docs/planner.md",
        highlight=False,
    )
    if rows:
        line = run_command(rows[0], n_gpus // n_nodes, n_nodes)
        console.print(f"run #1: {line}", highlight=False, soft_wrap=True)


def run_command(ranked, gpus_per_node: int, nodes: int) -> str:
    """The ``torchrun ... deepwhale train`` line that trains with ``ranked``'s layout, its
    pipeline schedule and microbatches, and its activation checkpointing."""
    lay, e = ranked.layout, ranked.estimate
    degrees = ",".join(
        f"{k}={getattr(lay, k)}"
        for k in ("dp", "dp_shard", "tp", "pp", "ep")
        if getattr(lay, k) > 1
    )
    parts = [f"torchrun --nproc-per-node {gpus_per_node}"]
    if nodes > 1:
        parts.append(f"--nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint HOST:29500")
    parts.append(f"-m deepwhale train -c cfg.yaml --parallel {degrees or 'dp=1'}")
    sets = []
    if lay.pp > 1:
        sets += [
            f"parallel.pp_schedule={lay.pp_schedule}",
            f"parallel.microbatches={e.microbatches}",
        ]
    if e.activation_checkpointing != "none":
        sets.append(f"train.activation_checkpointing={e.activation_checkpointing}")
    parts += [f"--set {x}" for x in sets]
    return " ".join(parts)


def _parsed(flag: str, parse, text: str):
    from deepwhale.parallel.planner import PlanError

    try:
        return parse(text)
    except PlanError as e:
        raise PlanError(f"{flag}: {e}") from None


def _positive_int(flag: str, text: str) -> int:
    from deepwhale.parallel.planner import PlanError

    try:
        n = int(text)
    except ValueError:
        raise PlanError(f"{flag} must be a positive integer, got {text!r}") from None
    if n < 1:
        raise PlanError(f"{flag} must be a positive integer, got {text!r}")
    return n


def _candidate_json(x) -> dict:
    e = x.estimate
    layout = {k: getattr(x.layout, k) for k in ("dp", "dp_shard", "tp", "pp", "ep", "pp_schedule")}
    return {
        "layout": layout,
        "name": x.name,
        "micro_batch_size": e.micro_batch_size,
        "microbatches": e.microbatches,
        "activation_checkpointing": e.activation_checkpointing,
        "global_batch_tokens": e.global_batch_tokens,
        "memory_bytes": {**dataclasses.asdict(e.memory), "total": e.memory.total},
        "bubble_fraction": e.bubble_fraction,
        "comm": [dataclasses.asdict(c) for c in e.comm],
        "comm_exposed_s": e.comm_s,
        "compute_s": e.compute_s,
        "step_s": e.step_s,
        "model_flops": e.model_flops,
        "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu,
        "mfu": e.mfu,
    }
