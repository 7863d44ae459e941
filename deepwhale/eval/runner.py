"""Run tasks on a model: build lm-eval-style requests, score them, reduce to metrics.

``evaluate(model, ["arc_easy", "ppl:notes.txt"], limit=20)`` returns the ``results.json``
structure (see :mod:`deepwhale.eval.report`).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

from deepwhale.eval import gen_runner, metrics
from deepwhale.eval.groups import GroupConfig, aggregate, resolve
from deepwhale.eval.scoring import encode_pair, prefix_token_id, score_requests
from deepwhale.eval.tasks import (
    SUPPORTED_OUTPUT_TYPES,
    TaskConfig,
    TaskError,
    build_examples,
    default_data_dir,
    load_docs,
)
from deepwhale.eval.windows import rolling_windows


@dataclasses.dataclass
class Prepared:
    """A task's rendered examples and the token requests they expand to."""

    task: TaskConfig
    examples: list
    requests: list[tuple[list[int], list[int]]]
    owners: list[int]  # request -> example index
    extra: list[dict]  # per example: rolling token counts, window counts


def prepare(
    task: TaskConfig,
    tokenizer,
    max_len: int,
    data_dir: Path,
    limit: int | None = None,
    ppl_stride: int = 1,
) -> Prepared:
    """Load, render and tokenize one task (the first ``limit`` test documents).

    Rolling documents are encoded with the tokenizer's defaults, as lm-eval 0.4.13's HF model
    does (``tok_encode(string)``): with a BOS-adding tokenizer the document starts with BOS, so
    the first window scores that BOS after the BOS prefix and it counts as a token.

    Raises:
        TaskError: bad data or templates; an output type this version cannot score.
    """
    if task.output_type not in SUPPORTED_OUTPUT_TYPES:
        raise TaskError(
            f"task {task.task}: output_type {task.output_type} is not supported yet "
            f"(supported: {', '.join(SUPPORTED_OUTPUT_TYPES)})"
        )
    all_docs = load_docs(task, task.test_split, data_dir)
    docs = all_docs[:limit] if limit is not None else all_docs
    fewshot = None
    if task.num_fewshot:  # same split: the same objects, so a document is never its own shot
        same = task.fewshot_split == task.test_split
        fewshot = all_docs if same else load_docs(task, task.fewshot_split, data_dir)
    examples = build_examples(task, docs, fewshot)
    requests, owners, extra = [], [], []
    if task.output_type == "generate_until":  # prompts, not scored pairs: see gen_runner
        return Prepared(task, examples, [], [], [{} for _ in examples])
    for ex in examples:
        if task.output_type == "multiple_choice":
            for choice in ex.choices:
                try:
                    requests.append(
                        encode_pair(tokenizer, ex.context, task.target_delimiter + choice)
                    )
                except ValueError as e:
                    raise TaskError(f"task {task.task}, doc {ex.index}: {e}") from None
                owners.append(ex.index)
            extra.append({})
        else:
            tokens = tokenizer.encode(ex.text)
            wins = rolling_windows(tokens, prefix_token_id(tokenizer), max_len, ppl_stride)
            for w in wins:
                requests.append((w.context, w.targets))
                owners.append(ex.index)
            extra.append({"tokens": len(tokens), "windows": len(wins)})
    return Prepared(task, examples, requests, owners, extra)


def reduce(prep: Prepared, scores: list, log_samples: bool) -> tuple[dict, list[dict]]:
    """Per-task metrics (with ``*_stderr``) and, if asked, per-sample records.

    Multiple choice: the task's ``process_results`` function (default ``acc``/``acc_norm``)
    per document, then the mean and its stderr of each metric in ``metric_names()``.

    Raises:
        TaskError: a document's metric function failed, or an empty rolling corpus.
    """
    task = prep.task
    per_doc: dict[int, list] = {}
    for owner, s in zip(prep.owners, scores, strict=True):
        per_doc.setdefault(owner, []).append(s)
    samples: list[dict] = []
    if task.output_type == "multiple_choice":
        processor, names = task.result_processor(), task.metric_names()
        values: dict[str, list[float]] = {name: [] for name in names}
        for ex in prep.examples:
            lls = [s.logprob for s in per_doc[ex.index]]
            try:
                m = processor.fn(ex.doc, lls, ex.choices, ex.gold)
            except ValueError as e:
                raise TaskError(f"task {task.task}, doc {ex.index}: {e}") from None
            m = {name: m[name] for name in names}
            for name in names:
                values[name].append(m[name])
            if log_samples:
                samples.append(
                    {
                        "doc_index": ex.index,
                        "context": ex.context,
                        "choices": ex.choices,
                        "gold": ex.gold,
                        "logprobs": lls,
                        "is_greedy": [s.is_greedy for s in per_doc[ex.index]],
                        **m,
                    }
                )
        result = {}
        for name in names:
            result[name] = metrics.mean(values[name])
            result[f"{name}_stderr"] = metrics.mean_stderr(values[name])
    else:
        lls, words, nbytes, tokens = [], 0, 0, 0
        for ex, extra in zip(prep.examples, prep.extra, strict=True):
            ll = sum(s.logprob for s in per_doc.get(ex.index, []))
            lls.append(ll)
            w, b = metrics.count_words(ex.text), metrics.count_bytes(ex.text)
            words, nbytes, tokens = words + w, nbytes + b, tokens + extra["tokens"]
            if log_samples:
                samples.append(
                    {"doc_index": ex.index, "loglikelihood": ll, "words": w, "bytes": b, **extra}
                )
        try:
            result = metrics.perplexity_metrics(lls, tokens, words, nbytes)
        except ValueError as e:
            raise TaskError(f"task {task.task}: {e}") from None
        result.update(tokens=tokens, words=words, bytes=nbytes)
    result["samples"] = len(prep.examples)
    return result, samples


def evaluate(
    model,
    tasks: Sequence[str | TaskConfig],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    ppl_stride: int = 1,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cache=None,
    max_gen_toks: int | None = None,
    sandbox_timeout: float = 10.0,
) -> dict:
    """Evaluate ``model`` (a :class:`~deepwhale.api.DeepSeekModel`) on ``tasks``.

    Args:
        model: the loaded model (it needs a tokenizer).
        tasks: task or group names (built-in, a YAML path, or ``ppl:FILE``),
            :class:`TaskConfig` or :class:`~deepwhale.eval.groups.GroupConfig`; a group runs
            every subject (``limit`` applies to each) and adds its aggregated line first.
        data_dir: where ``data_files`` are looked up (default :func:`default_data_dir`).
        limit: score only the first ``limit`` documents of each task.
        batch_size: rows per forward; scores do not depend on it.
        ppl_stride: minimum context per rolling window (see :mod:`deepwhale.eval.windows`).
        num_fewshot: override every task's ``num_fewshot``.
        log_samples: include per-sample records under ``"samples"``.
        progress: ``progress(done, total)`` over requests, for a progress bar.
        cache: a :class:`~deepwhale.eval.cache.ScoreCache`; cached requests (scores, and the
            greedy responses of generative tasks) are not computed again, and new ones are
            stored batch by batch (``--resume``).
        max_gen_toks: override every generate_until task's ``max_gen_toks`` (tokens; lm-eval's
            ``--gen_kwargs max_gen_toks=N``).
        sandbox_timeout: seconds per program for ``pass_at_1`` tasks (HumanEval).

    Returns:
        ``{"config", "versions", "results": {task: metrics}, "samples"?: {task: [...]}}``.

    Raises:
        TaskError: unknown task, bad task file, template or data.
        ValueError: the model has no tokenizer, or a bad argument.
    """
    if model.tokenizer is None:
        raise ValueError(f"{model.path}: no tokenizer.json; evaluation needs one")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    max_len = model.config.max_position_embeddings
    configs, groups = [], []
    for t in tasks:
        t = resolve(t) if isinstance(t, str) else t
        if isinstance(t, GroupConfig):
            groups.append(t)
            configs.extend(t.tasks)
        else:
            configs.append(t)
    if num_fewshot is not None:
        configs = [dataclasses.replace(c, num_fewshot=num_fewshot) for c in configs]
    if max_gen_toks is not None:
        if max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        configs = [
            dataclasses.replace(
                c, generation_kwargs={**(c.generation_kwargs or {}), "max_gen_toks": max_gen_toks}
            )
            if c.output_type == "generate_until"
            else c
            for c in configs
        ]
    prepared = [prepare(c, model.tokenizer, max_len, data_dir, limit, ppl_stride) for c in configs]
    total = sum(len(p.examples) if _generative(p) else len(p.requests) for p in prepared)
    done = 0
    if progress is not None:
        progress(0, total)  # everything is loaded and rendered: the bar may start

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    results, samples = {}, {}
    for prep in prepared:
        name = prep.task.task
        if _generative(prep):
            prompts = gen_runner.contexts(prep.task, model.tokenizer, prep.examples, max_len)
            responses = gen_runner.generate(
                model, prep.task, prompts, batch_size, tick, cache, max_len
            )
            results[name], samples[name] = gen_runner.reduce_generations(
                prep.task, prep.examples, responses, log_samples, sandbox_timeout
            )
            continue
        scores = _score(_scorer(model), prep, max_len, batch_size, tick, cache)
        results[name], samples[name] = reduce(prep, scores, log_samples)
    first = {g.tasks[0].task: g for g in groups if g.tasks}
    ordered = {}
    for name, res in results.items():  # lm-eval's order: the group line, then its subjects
        if name in first:
            g = first[name]
            ordered[g.group] = aggregate([results[t.task] for t in g.tasks], g.weights)
        ordered[name] = res
    results = ordered
    out = {
        "config": {
            "model": str(model.path) if model.path is not None else None,
            "tasks": [c.task for c in configs],
            "task_files": {c.task: c.source for c in configs},
            "data_dir": str(data_dir),
            "limit": limit,
            "batch_size": batch_size,
            "ppl_stride": ppl_stride,
            "max_length": max_len,
            "num_fewshot": {c.task: c.num_fewshot for c in configs},
            "device": str(model.device),
            "dtype": _dtype(model),
        },
        "versions": _versions(),
        "results": results,
        "group_subtasks": {g.group: [t.task for t in g.tasks] for g in groups},
    }
    if log_samples:
        out["samples"] = samples
    return out


def _generative(prep: Prepared) -> bool:
    return prep.task.output_type == "generate_until"


def _scorer(model) -> Callable:
    """``score_requests(requests, max_len, batch_size, progress, on_batch)`` for ``model``: its
    own (a :class:`~deepwhale.eval.remote.RemoteModel`), else the local forward pass."""
    own = getattr(model, "score_requests", None)
    if own is not None:
        return own
    return lambda *args: score_requests(model.module, *args)


def _dtype(model) -> str:
    if getattr(model, "module", None) is None:
        return str(getattr(model, "dtype", "unknown"))
    return str(next(model.module.parameters()).dtype).removeprefix("torch.")


def _score(scorer, prep: Prepared, max_len: int, batch_size: int, tick, cache) -> list:
    """Scores of ``prep.requests``: from ``cache`` where present, the rest scored (and stored)."""
    if cache is None:
        return scorer(prep.requests, max_len, batch_size, tick)
    keys = cache.keys(prep.task.task, max_len, prep.requests)
    scores = cache.get(keys, prep.requests)
    missing = [i for i, s in enumerate(scores) if s is None]
    tick(len(scores) - len(missing))
    sub = [prep.requests[i] for i in missing]

    def store(batch: list[int], got: list) -> None:
        cache.put([keys[missing[j]] for j in batch], got)

    for j, s in enumerate(scorer(sub, max_len, batch_size, tick, store)):
        scores[missing[j]] = s
    return scores


def _versions() -> dict:
    import torch

    from deepwhale import __version__

    return {
        "deepwhale": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
