"""``deepwhale data ...``: the data pipeline's verbs (wired into the main CLI as ``data``).

Only typer and the standard library are imported at module level; Beam and the pipeline load
inside the command. Bad input (malformed YAML, an unknown stage or parameter, a missing file)
prints one red line and exits with status 2, never a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

data_app = typer.Typer(
    help="Data pipeline on Apache Beam: read, clean, deduplicate, filter, augment, pack shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@data_app.callback()
def _group() -> None:
    """Data pipeline on Apache Beam (keeps ``run`` a sub-command even while it is the only one)."""


def _warn(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(
        f"[bold yellow]warning:[/] {message}", highlight=False, markup=True
    )


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/] {message}", highlight=False, markup=True
    )
    raise typer.Exit(2)


def _set_value(raw: dict, assignment: str) -> None:
    """Apply ``stage.param=value`` (or ``streaming.key=value``, ``options.key=value``,
    ``key=value``) to the raw config; the value is parsed as YAML (``0.7``, ``[zh, en]``)."""
    import yaml

    from deepwhale.data.config import PipelineConfigError

    if "=" not in assignment:
        raise PipelineConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if "." not in key:
        raw[key] = value
        return
    head, name = key.split(".", 1)
    if head in ("streaming", "options"):
        raw.setdefault(head, {})[name] = value
        return
    for i, item in enumerate(raw.get("stages") or []):
        if item == head:
            raw["stages"][i] = item = {head: {}}
        if isinstance(item, dict) and head in item:
            if item[head] is None:
                item[head] = {}
            item[head][name] = value
            return
    raise PipelineConfigError(f"--set {key}: stage {head!r} is not in the pipeline's stages")


def build_config(
    config: Path | None,
    inputs: list[str] | None,
    fmt: str | None,
    split: str | None,
    field: str | None,
    output: str | None,
    stages: str | None,
    sets: list[str] | None,
    mode: str | None,
    runner: str | None,
    dictionary: str | None = None,
):
    """Merge the YAML file (if any) with the flags into a ``PipelineConfig``; flags win.

    Raises:
        PipelineConfigError: neither a config nor ``--input``, a config without ``input`` and
            no ``--input``, or any schema error.
    """
    from deepwhale.data.config import PipelineConfigError, load_yaml, parse_config

    raw: dict[str, Any] = load_yaml(config) if config is not None else {}
    overrides = {
        k: v for k, v in (("format", fmt), ("split", split), ("field", field)) if v is not None
    }
    if inputs:
        raw["input"] = [{"path": p, **overrides} for p in inputs]
    elif overrides and raw.get("input") is not None:
        items = raw["input"] if isinstance(raw["input"], list) else [raw["input"]]
        raw["input"] = [{**({"path": i} if isinstance(i, str) else i), **overrides} for i in items]
    if raw.get("input") is None:
        if config is not None:
            raise PipelineConfigError(
                f"{config}: the config has no 'input' key; add one or give --input PATH"
            )
        raise PipelineConfigError("give --config FILE or at least one --input PATH")
    if output is not None:
        raw["output"] = output
    if stages is not None:
        raw["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    if mode is not None:
        raw["mode"] = mode
    if runner is not None:
        raw["runner"] = runner
    if dictionary is not None:
        raw["dictionary"] = dictionary
    for assignment in sets or []:
        _set_value(raw, assignment)
    return parse_config(raw, source=str(config) if config else "flags")


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"deepwhale data run ({report['wall_s']:.1f} s)")
    for col in ("stage", "in", "kept", "dropped (by reason)"):
        table.add_column(col)
    for stage, c in report["stages"].items():
        extras = {k: v for k, v in c.items() if k not in ("in", "kept", "dropped", "docs")}
        dropped = ", ".join(
            f"{k}={v}" for k, v in sorted({**c.get("dropped", {}), **extras}.items())
        )
        seen = c.get("in", c.get("docs", ""))
        table.add_row(stage, str(seen), str(c.get("kept", "")), dropped)
    Console().print(table)
    if "shards" in report:
        s = report["shards"]
        Console().print(f"shards: {s['files']} files, {s['rows']} rows x {s['seq_len']} tokens")


@data_app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Pipeline YAML (stages and params).")
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="File, glob or folder to read (repeatable)."),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(help="Input format: text, jsonl, parquet, novel, poetry, pairs."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="text format: line, block or document per doc.")
    ] = None,
    field: Annotated[str | None, typer.Option(help="jsonl/parquet: the text field.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output folder (report, shards).")
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated stages with default params, e.g. clean,quality."),
    ] = None,
    set: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a parameter: stage.param=value (YAML value; repeatable)."
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option(help="batch or streaming.")] = None,
    runner: Annotated[
        str | None,
        typer.Option(help="Beam runner (default FnApiRunner, in-process, no network)."),
    ] = None,
    dictionary: Annotated[
        str | None,
        typer.Option(
            help="Domain dictionary (.yaml/.csv): quality's jieba user words, augment's "
            "protected terms, normalize_terms' synonyms."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Run the data pipeline: read, then apply the configured stages in order.

    Any other --flag is passed to Beam's PipelineOptions unchanged, e.g.
    --direct_num_workers=2 --direct_running_mode=multi_processing; flags Beam does not
    recognise are named in a warning on stderr (the run goes on). Writes report.json,
    perplexity_hist.png (with a perplexity stage), shards/ (with tokenize) or docs/ (without)
    into the output folder.
    """
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)
    # A worker that fails logs its traceback through Beam's loggers; the error is re-raised
    # here and printed as one line instead.
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    from deepwhale.data.config import PipelineConfigError

    try:
        cfg = build_config(
            config, input, format, split, field, output, stages, set, mode, runner, dictionary
        )
        from deepwhale.data.pipeline import run as run_pipeline

        report = run_pipeline(
            cfg,
            extra_args=list(ctx.args),
            progress=None if quiet else typer.echo,
            warn=_warn,
        )
    except (PipelineConfigError, ValueError, OSError, ImportError) as e:
        from deepwhale.extras import describe_import_error

        _fail(describe_import_error(e).split("\n")[0])
    if not quiet:
        _print_summary(report)


@data_app.command()
def monitor(
    out_dir: Annotated[Path, typer.Argument(help="The output folder of a streaming run.")],
    once: Annotated[bool, typer.Option(help="Print the screen once and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between redraws.")] = 2.0,
    fail_on_alert: Annotated[
        bool, typer.Option(help="With --once: exit 1 when the last window has alerts.")
    ] = False,
) -> None:
    """Show a streaming run's live quality monitor: documents in and out per window, drop
    reasons, the perplexity distribution and alerts (from OUT_DIR/monitor/live.json)."""
    from rich.console import Console

    from deepwhale.data.monitor_view import MonitorError, read_live, render, watch

    if interval <= 0:
        _fail(f"--interval must be > 0, got {interval}")
    try:
        if not once:
            watch(out_dir, interval, Console())
            return
        live = read_live(out_dir)
    except MonitorError as e:
        _fail(str(e))
    Console(width=120).print(render(live))
    windows = live["windows"]
    if fail_on_alert and windows and windows[-1]["alerts"]:
        raise typer.Exit(1)
