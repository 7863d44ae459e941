"""``deepwhale eval``: log-likelihood tasks and perplexity on a model.

Registered in the top-level app as ``app.command("eval")(eval_command)``. Only typer and the
standard library load at import; torch, the model and the tasks load inside the command. Bad
input (unknown task, malformed task file, missing data, a template failing) prints one
``error:`` line and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def _user_errors() -> tuple[type[BaseException], ...]:
    from deepwhale.checkpoint.hub import CheckpointError
    from deepwhale.eval.remote import RemoteError
    from deepwhale.model.config import ConfigError
    from deepwhale.tokenizer import TokenizerError

    return (
        CheckpointError,
        ConfigError,
        TokenizerError,
        RemoteError,
        ValueError,
        OSError,
        ImportError,
    )


def _is_url(name: str | None) -> bool:
    from deepwhale.eval.remote import is_url

    return is_url(name)


def _load(model, tokenizer, api_key, max_length, dtype, device):
    """The local model, or a :class:`~deepwhale.eval.remote.RemoteModel` for a server URL."""
    if not _is_url(model):
        from deepwhale.api import DeepSeekModel

        return DeepSeekModel.from_pretrained(model, dtype=dtype, device=device)
    from deepwhale.eval.remote import RemoteModel
    from deepwhale.tokenizer import Tokenizer

    if tokenizer is None:
        raise ValueError(
            "--model URL needs --tokenizer DIR: the served checkpoint's folder with its "
            "tokenizer.json, so prompts are tokenized as the server's model expects"
        )
    return RemoteModel(model, Tokenizer.from_pretrained(tokenizer), api_key, max_length=max_length)


def eval_command(
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            "-t",
            help="Tasks, comma-separated or repeated: arc_easy, hellaswag, truthfulqa_mc1/2, "
            "gsm8k and humaneval (greedy generation), "
            "ceval / cmmlu (5-shot, every subject and the size-weighted average) or one "
            "subject (ceval-valid_computer_network, cmmlu_anatomy), a task or group YAML "
            "file, or ppl:FILE (a text file, or .jsonl of {'text': ...}).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint folder, Hub repo id (default: stories260K), or an "
            "OpenAI-compatible server, http://HOST:PORT/v1 (scored with echo logprobs; "
            "needs --tokenizer).",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="With a server --model: the served checkpoint's folder (tokenizer.json)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DEEPWHALE_API_KEY",
            help="With a server --model: its API key (default $DEEPWHALE_API_KEY).",
        ),
    ] = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            help="With a server --model: its context, tokens (default: max_model_len from "
            "/v1/models)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score the first N documents per task (per subject).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per forward; scores do not depend on it.")
    ] = 1,
    ppl_stride: Annotated[
        int,
        typer.Option(
            help="ppl tasks: minimum tokens of context per window after the first, in "
            "[1, model context]; 1 = lm-eval's disjoint windows."
        ),
    ] = 1,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Override every task's num_fewshot.")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder the task files' data_files are relative to (default: shared bench)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write results.json and results.md to this folder.")
    ] = None,
    log_samples: Annotated[
        bool, typer.Option(help="Keep per-sample scores in results.json.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Reuse the per-request score cache in --out (eval_cache.sqlite) and score "
            "only what an interrupted run left; without it the cache starts empty."
        ),
    ] = False,
    compare: Annotated[
        list[Path] | None,
        typer.Option(
            help="Compare earlier runs instead: --compare DIR1 --compare DIR2 (folders with "
            "results.json); prints one table with ratios to the first, --out writes "
            "compare.md and compare.png."
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Evaluate the model in each mode, e.g. fp32,int8,int8-dynamic (the "
            "DeepSeekModel.quantize transform): one sub-folder of --out per mode plus "
            "compare.md with ratios to the first mode and weight bytes."
        ),
    ] = None,
    max_gen_toks: Annotated[
        int | None,
        typer.Option(
            help="generate_until tasks: new tokens at most, overriding the task file "
            "(lm-eval's --gen_kwargs max_gen_toks=N)."
        ),
    ] = None,
    sandbox_timeout: Annotated[
        float, typer.Option(help="HumanEval: seconds per program before it is killed.")
    ] = 10.0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1...")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16, float16 (default: fp32 on CPU).")
    ] = None,
) -> None:
    """Evaluate a model on log-likelihood and generative tasks (lm-eval definitions) and
    print a table."""
    names = [t.strip() for group in tasks or [] for t in group.split(",") if t.strip()]
    try:
        if compare:
            return _compare(compare, out)
        if not names:
            raise ValueError("give --tasks (or --compare DIR ...)")
        from deepwhale.eval.groups import resolve
        from deepwhale.eval.report import markdown_table, write_report
        from deepwhale.eval.runner import evaluate

        if resume and out is None:
            raise ValueError("--resume needs --out (the cache lives in that folder)")
        configs = [resolve(n) for n in names]  # fail on a bad name before loading the model
        if quantize and _is_url(model):
            raise ValueError("--quantize needs a local model, not a server URL")
        if quantize:
            modes = [q.strip() for q in quantize.split(",") if q.strip()]
            return _quantize_runs(
                modes,
                configs,
                model,
                dtype,
                device,
                out,
                resume,
                quiet,
                **{
                    "limit": limit,
                    "batch_size": batch_size,
                    "ppl_stride": ppl_stride,
                    "num_fewshot": num_fewshot,
                    "data_dir": data_dir,
                    "log_samples": log_samples,
                    "max_gen_toks": max_gen_toks,
                    "sandbox_timeout": sandbox_timeout,
                },
            )
        m = _load(model, tokenizer, api_key, max_length, dtype, device)
        cache = None
        if out is not None:
            from deepwhale.eval.cache import FILENAME, ScoreCache, model_identity

            out.mkdir(parents=True, exist_ok=True)
            cache = ScoreCache(out / FILENAME, model_identity(m), fresh=not resume)
        with _progress(quiet) as progress:
            results = evaluate(
                m,
                configs,
                data_dir=data_dir,
                limit=limit,
                batch_size=batch_size,
                ppl_stride=ppl_stride,
                num_fewshot=num_fewshot,
                log_samples=log_samples,
                progress=progress,
                cache=cache,
                max_gen_toks=max_gen_toks,
                sandbox_timeout=sandbox_timeout,
            )
        if cache is not None:
            results["config"]["cache"] = {"reused": cache.hits, "scored": cache.stored}
            if resume:
                typer.echo(
                    f"resumed: {cache.hits} requests from cache, {cache.stored} scored", err=True
                )
            cache.close()
        results["config"]["model"] = model or "stories260K (bundled)"
        table = markdown_table(results)
        sys.stdout.write(table)
        if out is not None:
            json_path, _ = write_report(results, out)
            from deepwhale.eval.plot import write_chart

            write_chart([results], out / "results.png")
            typer.echo(f"wrote {json_path}", err=True)
    except _user_errors() as e:
        from deepwhale.extras import describe_import_error

        typer.echo(f"error: {describe_import_error(e)}", err=True)
        raise typer.Exit(2) from None


def _quantize_runs(modes, configs, model, dtype, device, out, resume, quiet, **kw) -> None:
    from deepwhale.api import DeepSeekModel
    from deepwhale.atomic import atomic_write
    from deepwhale.eval.cache import FILENAME, ScoreCache, model_identity
    from deepwhale.eval.compare import compare_table
    from deepwhale.eval.plot import write_chart
    from deepwhale.eval.report import write_report
    from deepwhale.eval.runner import evaluate
    from deepwhale.inference.quantize import MODES, weight_bytes

    if out is None:
        raise ValueError("--quantize needs --out (one sub-folder per mode)")
    for mode in modes:
        if mode not in ("fp32", *MODES):
            raise ValueError(
                f"--quantize: unknown mode {mode!r}; choose from fp32, {', '.join(MODES)}"
            )
    runs, sizes = [], []
    for mode in modes:
        m = DeepSeekModel.from_pretrained(model, dtype=dtype, device=device)
        if mode != "fp32":
            m.quantize(mode)
        sub = out / mode
        sub.mkdir(parents=True, exist_ok=True)
        ident = model_identity(m, quantize=None if mode == "fp32" else mode)
        cache = ScoreCache(sub / FILENAME, ident, fresh=not resume)
        with _progress(quiet) as progress:
            results = evaluate(m, configs, progress=progress, cache=cache, **kw)
        cache.close()
        results["config"]["model"] = model or "stories260K (bundled)"
        results["config"]["quantize"] = mode
        results["weight_bytes"] = weight_bytes(m.module)
        write_report(results, sub)
        write_chart([results], sub / "results.png")
        runs.append(results)
        sizes.append(results["weight_bytes"])
    table = compare_table(runs, modes, extra_rows=[("weight_bytes", sizes)])
    sys.stdout.write(table)
    atomic_write(out / "compare.md", lambda p: p.write_text(table, encoding="utf-8"))
    write_chart(runs, out / "compare.png", modes)
    typer.echo(f"wrote {out / 'compare.md'}", err=True)


def _compare(folders: list[Path], out: Path | None) -> None:
    from deepwhale.atomic import atomic_write
    from deepwhale.eval.compare import compare_table, labels_for, load_run
    from deepwhale.eval.plot import write_chart

    runs = [load_run(f) for f in folders]
    labels = labels_for(folders)
    table = compare_table(runs, labels)
    sys.stdout.write(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "compare.md", lambda p: p.write_text(table, encoding="utf-8"))
        write_chart(runs, out / "compare.png", labels)
        typer.echo(f"wrote {out / 'compare.md'}", err=True)


class _progress:
    """A rich progress bar over scored requests (stderr), started on the first update (after
    the tasks loaded, so data errors print without a bar); nothing when ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def __enter__(self):
        return None if self.quiet else self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[bold]eval",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("eval", total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
