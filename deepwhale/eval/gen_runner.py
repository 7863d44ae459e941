"""Run ``generate_until`` tasks: greedy generation, stop sequences, filters, exact match.

Follows lm-eval 0.4.13's HF model (``HFLM.generate_until``) and task pipeline:

- the context is encoded with the tokenizer's defaults (BOS where the tokenizer adds one) and
  left-truncated to ``max_length - max_gen_toks`` tokens, so the generation always fits;
- greedy decoding for at most ``max_gen_toks`` new tokens, stopping at EOS or once any
  ``until`` string appears; the decoded text is cut at the first ``until`` string;
- each ``filter_list`` chain maps the response to an answer, and ``exact_match`` (with the
  task's options) compares it with ``doc_to_target``; mean and stderr per filter.

Greedy output does not depend on ``batch_size``: the engine gives every prompt its own cache
slot, and a row's numbers do not depend on the other rows (dense models; see
:mod:`deepwhale.inference.engine`).
"""

from __future__ import annotations

from collections.abc import Callable

from deepwhale.eval import metrics
from deepwhale.eval.generative import apply_chain, build_filters, cut_at_stop, exact_match
from deepwhale.eval.sandbox import run_program
from deepwhale.eval.tasks import TaskConfig, TaskError, target_text


def metric_name(filter_name: str, metric: str = "exact_match") -> str:
    """Our key for a metric under a filter: ``<metric>_<filter>`` (``<metric>`` alone for
    lm-eval's implicit ``none`` filter); lm-eval writes ``<metric>,<filter>``."""
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def contexts(task: TaskConfig, tokenizer, examples: list, max_len: int) -> list[list[int]]:
    """Token ids of each example's context, left-truncated to ``max_len - max_gen_toks``.

    Raises:
        TaskError: ``max_gen_toks`` leaves no room for a context in ``max_len`` tokens.
    """
    _, max_gen = task.generation()
    room = max_len - max_gen
    if room < 1:
        raise TaskError(
            f"task {task.task}: max_gen_toks {max_gen} leaves no room for a prompt in the "
            f"model's {max_len}-token context"
        )
    return [tokenizer.encode(ex.context)[-room:] for ex in examples]


def generate(
    model,
    task: TaskConfig,
    prompts: list[list[int]],
    batch_size: int,
    tick: Callable[[int], None],
    cache=None,
    max_len: int = 0,
) -> list[str]:
    """The task's greedy completions of ``prompts`` (see :func:`greedy`).

    With ``cache`` (a :class:`~deepwhale.eval.cache.ScoreCache`), responses already stored for
    this model, task, ``max_len``, budget and stop strings are reused, and the rest are
    generated and stored batch by batch (``--resume``).
    """
    until, max_gen = task.generation()
    if cache is None:
        return greedy(model, prompts, until, max_gen, batch_size, tick)
    keys = cache.generation_keys(task.task, max_len, max_gen, until, prompts)
    out = cache.get_generations(keys)
    missing = [i for i, t in enumerate(out) if t is None]
    tick(len(out) - len(missing))
    for start in range(0, len(missing), batch_size):
        idx = missing[start : start + batch_size]
        texts = greedy(model, [prompts[i] for i in idx], until, max_gen, batch_size)
        cache.put_generations([keys[i] for i in idx], texts)
        tick(len(idx))
        for i, t in zip(idx, texts, strict=True):
            out[i] = t
    return out


def greedy(
    model,
    prompts: list[list[int]],
    until: list[str],
    max_gen: int,
    batch_size: int,
    tick: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (token ids): at most ``max_gen`` new tokens each,
    ``batch_size`` prompts at a time, cut at the first ``until`` string.

    ``model`` is a :class:`~deepwhale.api.DeepSeekModel`: the generated ids are decoded on their
    own (``skip_special_tokens``), as lm-eval's HF model decodes them, so a SentencePiece
    tokenizer drops the leading space of the first token. Anything else needs a
    ``generate_batch(prompts, temperature=, max_new_tokens=, stop=)`` returning texts.
    """
    from deepwhale.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_gen, stop=until)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        if hasattr(model, "engine"):
            reqs = model.engine.generate(batch, params)
            texts = [
                model.tokenizer.decode(r.sequences[0].output_ids, skip_special_tokens=True)
                for r in reqs
            ]
        else:
            texts = model.generate_batch(batch, temperature=0, max_new_tokens=max_gen, stop=until)
        out.extend(cut_at_stop(t, until) for t in texts)
        if tick is not None:
            tick(len(batch))
    return out


def reduce_generations(
    task: TaskConfig,
    examples: list,
    responses: list[str],
    log_samples: bool,
    sandbox_timeout: float = 10.0,
) -> tuple[dict, list[dict]]:
    """Per-filter metric mean and stderr, and per-sample records if asked.

    ``exact_match`` compares the filtered answer with the target; ``pass_at_1`` runs
    ``context + answer + "\n" + target`` in :func:`deepwhale.eval.sandbox.run_program`
    (``sandbox_timeout`` seconds each) and scores 1 when it passes.

    Raises:
        TaskError: a target template failed (names the task and the document).
    """
    chains = build_filters(task.filter_list, f"{task.source}: key 'filter_list'")
    options = task.exact_match_options()
    metric = task.gen_metric()
    values: dict[str, list[float]] = {metric_name(name, metric): [] for name, _ in chains}
    samples = []
    for ex, resp in zip(examples, responses, strict=True):
        target = target_text(task, ex.doc, ex.index)
        record = {"doc_index": ex.index, "context": ex.context, "response": resp, "target": target}
        for name, steps in chains:
            answer = apply_chain(steps, [resp])
            if metric == "pass_at_1":
                run = run_program(f"{ex.context}{answer}\n{target}", timeout_s=sandbox_timeout)
                score = float(run.passed)
                record[f"run_{name}"] = run.status
            else:
                score = exact_match(answer, target, **options)
            values[metric_name(name, metric)].append(score)
            record[f"filtered_{name}"] = answer
            record[metric_name(name, metric)] = score
        if log_samples:
            samples.append(record)
    result: dict = {}
    for name, vals in values.items():
        result[name] = metrics.mean(vals)
        result[f"{name}_stderr"] = metrics.mean_stderr(vals)
    result["samples"] = len(examples)
    return result, samples
