"""Typer commands for training: ``train``, ``finetune lora`` and ``lora merge``.

Register them in the top-level app::

    from deepwhale.train.cli import finetune_app, lora_app, train
    app.command("train")(train)
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(lora_app, name="lora")

Only typer and the standard library are imported here; torch and the trainer load inside the
commands. Bad input prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

finetune_app = typer.Typer(help="Fine-tune a model (LoRA on chat data).", no_args_is_help=True)
lora_app = typer.Typer(help="Work with LoRA adapters.", no_args_is_help=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a config key, e.g. --set optim.lr=3e-4 (repeatable).",
    ),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepwhale.checkpoint.hub import CheckpointError
    from deepwhale.model.config import ConfigError
    from deepwhale.tokenizer import TokenizerError
    from deepwhale.train.checkpoint import CheckpointNotFound
    from deepwhale.train.config import TrainConfigError

    return (
        TrainConfigError,
        CheckpointNotFound,
        CheckpointError,
        ConfigError,
        TokenizerError,
        ValueError,
        OSError,
        ImportError,
    )


def _fail(e: BaseException) -> None:
    from deepwhale.extras import describe_import_error

    typer.echo(f"error: {describe_import_error(e)}", err=True)
    raise typer.Exit(2)


def _run(cfg_path: Path | None, overrides: list[str], quiet: bool) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from deepwhale.parallel.runtime import launched_by_torchrun
        from deepwhale.train.config import load_config
        from deepwhale.train.trainer import Trainer

        cfg = load_config(cfg_path, overrides)
        if quiet:
            cfg.log.quiet = True
        if launched_by_torchrun() or cfg.parallel.is_parallel():
            history = _run_parallel(cfg)
        else:
            trainer = Trainer(cfg)
            history = trainer.fit()
    except _user_errors() as e:
        _fail(e)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        typer.echo("interrupted; resume with --resume auto", err=True)
        raise typer.Exit(130) from None
    if not cfg.log.quiet and history:
        last = history[-1]
        val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        typer.echo(f"done: step {last['step']}, loss {last['loss']:.4f}{val} -> {cfg.out_dir}")


_PREFLIGHT_WAIT_S = 60.0  # other ranks after a bad layout (torchrun ends them sooner)


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank died (gloo/NCCL transport)."""
    return any(m in str(e) for m in _PEER_GONE)


def _run_parallel(cfg, keep_group: bool = False) -> list:
    """One rank of a ``torchrun`` job. The layout is checked on every rank before any process
    group exists, so a bad one exits 2 everywhere with one line from rank 0; an error after that
    is printed by the rank it happened on, prefixed ``rank R/W``, and torchrun stops the others.
    ``keep_group``: leave the process group up for another run in the same job (tests)."""
    from deepwhale.parallel.layout import LayoutError, describe
    from deepwhale.parallel.runtime import env_world, init_runtime, launched_by_torchrun, preflight

    rank, _, world = env_world()
    try:
        if not launched_by_torchrun():
            need = cfg.parallel.fixed_size
            raise LayoutError(
                f"parallel {describe(cfg.parallel)} needs {need} processes: start it with "
                f"torchrun --nproc-per-node {need} -m deepwhale train ..."
            )
        layout = preflight(cfg, world)
    except _user_errors() as e:
        if rank == 0:
            _fail(e)
        else:  # let rank 0 print and exit first: torchrun then stops this rank (SIGTERM)
            import time

            time.sleep(_PREFLIGHT_WAIT_S)
        raise typer.Exit(2) from None
    from deepwhale.parallel.runtime import shutdown
    from deepwhale.parallel.trainer import ParallelTrainer

    try:
        runtime = init_runtime(layout, cfg.train.device)
        trainer = ParallelTrainer(cfg, runtime)
        history = trainer.fit()
    except _user_errors() as e:
        from deepwhale.extras import describe_import_error
        from deepwhale.train.checkpoint import NoUsableCheckpoint

        # every rank raises NoUsableCheckpoint (rank 0 decided and broadcast): one line, rank 0's;
        # the others wait for rank 0 to print and exit, then torchrun stops them (SIGTERM)
        if rank != 0 and isinstance(e, NoUsableCheckpoint):
            import time

            time.sleep(_PREFLIGHT_WAIT_S)
        else:
            typer.echo(f"error: rank {rank}/{world}: {describe_import_error(e)}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:  # a crash on this rank: one line naming it, then torchrun stops all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if _lost_peer(e):  # the consequence of another rank's failure, not a second error
            typer.echo(f"rank {rank}/{world}: stopped, a peer rank went away ({first})", err=True)
        else:
            typer.echo(f"error: rank {rank}/{world}: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    if not keep_group:
        shutdown()
    return history if rank == 0 else []


def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (see examples/train).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Config overrides as section.key=value (e.g. train.steps=100)."),
    ] = None,
    set_: SetOpt = None,
    resume: Annotated[
        str | None, typer.Option(help="none, auto (newest complete checkpoint) or a folder.")
    ] = None,
    out_dir: Annotated[str | None, typer.Option(help="Run folder (config: out_dir).")] = None,
    parallel: Annotated[
        str | None,
        typer.Option(
            help="Parallel layout under torchrun, e.g. dp=2,tp=2,pp=2 (dp, dp_shard, tp, pp, ep); "
            "the same as the config's parallel: section."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train or continue a model from a YAML config; any key can be overridden.

    Data: packed shards (a folder with manifest.json), a .txt file or a .jsonl file. Writes
    metrics.csv, TensorBoard events (tb/), checkpoints/step-N and final/ (an HF folder) under
    out_dir.

    Under torchrun (torchrun --nproc-per-node 4 -m deepwhale train -c cfg.yaml --parallel
    dp=2,tp=2) every process trains its share; checkpoints are then sharded (torch DCP). With
    torchrun --max-restarts N, workers restarted after a crash resume from the newest complete
    checkpoint and write out_dir/recovery.json (set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on gloo).
    """
    extra = list(overrides or []) + list(set_ or [])
    if resume is not None:
        extra.append(f"checkpoint.resume={resume}")
    if out_dir is not None:
        extra.append(f"out_dir={out_dir}")
    if parallel is not None:
        from deepwhale.parallel.layout import LayoutError, parse_layout

        try:
            extra += [f"parallel.{k}={v}" for k, v in parse_layout(parallel).items()]
        except LayoutError as e:
            _fail(e)
    _run(config, extra, quiet)


@finetune_app.command("lora")
def finetune_lora(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder to adapt.")],
    data: Annotated[
        str, typer.Option(help="Chat JSONL: {messages: [...]} or {question, answer} lines.")
    ],
    out_dir: Annotated[str, typer.Option(help="Run folder; the adapter goes to adapter/.")] = (
        "runs/lora"
    ),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config to start from.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale alpha / r).")] = 32.0,
    micro_batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    max_len: Annotated[int, typer.Option(help="Longest example in tokens (cut).")] = 512,
    limit: Annotated[int | None, typer.Option(help="Use the first N examples.")] = None,
    set_: SetOpt = None,
    resume: Annotated[str, typer.Option(help="none, auto or a checkpoint folder.")] = "none",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Supervised LoRA fine-tuning on chat data: the tokenizer's chat template is applied and
    prompt tokens are masked from the loss; the adapter is saved in PEFT's format."""
    base = [
        f"model.name={model}",
        f"data.path={data}",
        "data.format=chat",
        f"data.seq_len={max_len}",
        f"out_dir={out_dir}",
        f"train.steps={steps}",
        f"optim.lr={lr}",
        "lora.enabled=true",
        f"lora.r={r}",
        f"lora.alpha={alpha}",
        f"train.micro_batch_size={micro_batch_size}",
        f"train.grad_accum={grad_accum}",
        f"checkpoint.resume={resume}",
        "optim.weight_decay=0.0",
    ]
    if limit is not None:
        base.append(f"data.limit={limit}")
    if not Path(model).is_dir():
        _fail(FileNotFoundError(f"{model}: model folder not found"))
    _run(config, base + list(set_ or []), quiet)


@lora_app.command("merge")
def lora_merge(
    model: Annotated[str, typer.Option("--model", "-m", help="Base checkpoint folder.")],
    adapter: Annotated[str, typer.Option(help="Adapter folder (adapter_config.json).")],
    out: Annotated[str, typer.Option(help="Output folder for the merged HF checkpoint.")],
) -> None:
    """Fold a LoRA adapter into its base model and write a full HF checkpoint."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from deepwhale.lora import LoraError, merge_adapter_folder

        if not Path(model).is_dir():
            raise FileNotFoundError(f"{model}: model folder not found")
        folder = merge_adapter_folder(model, adapter, out)
    except (*_user_errors(), LoraError) as e:
        _fail(e)
    typer.echo(f"merged {adapter} into {model} -> {folder}")


def main() -> None:  # pragma: no cover - `python -m deepwhale.train.cli`
    """Stand-alone entry point with the three commands."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    app.command("train")(train)
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(lora_app, name="lora")
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
