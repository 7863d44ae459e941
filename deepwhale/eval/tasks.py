"""Task files: a YAML subset of lm-eval 0.4.x's task format, and the built-in tasks.

A task file (built-ins live in ``deepwhale/eval/tasks/*.yaml``)::

    task: arc_easy
    dataset_path: json                 # json | hellaswag_text | text (see datasets.py)
    data_files: {test: arc_easy/test.json, validation: arc_easy/validation.json}
    test_split: test                   # the split scored
    fewshot_split: validation          # where few-shot examples come from
    fewshot_config: {sampler: first_n} # optional: the first n (default: seeded random sample)
    output_type: multiple_choice       # | loglikelihood_rolling | generate_until
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_target: "{{choices.label.index(answerKey)}}"
    doc_to_choice: "{{choices.text}}"
    process_docs: hellaswag            # optional, a name from preprocess.PROCESSORS
    process_results: truthfulqa_mc2    # optional, a name from metrics.RESULT_PROCESSORS
    metric_list: [{metric: acc}]       # optional: report only these (default: all computed)
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    num_fewshot: 0
    include: base.yaml                 # optional: that file's keys, overridden by this one's

``include`` (a path, or a list of them, relative to the including file) works as lm-eval's:
the included files are read first (later ones win) and the including file's own keys win.
``metric_list`` entries are lm-eval's ``{metric, aggregation, higher_is_better}``; the
aggregation can only be ``mean``. Multiple choice computes ``acc`` and ``acc_norm``
(``metrics.multiple_choice_metrics``) unless ``process_results`` names another function.

``generate_until`` tasks (lm-eval 0.4.13's ``gsm8k.yaml`` keys) are generated greedily:
``generation_kwargs: {until: [...], max_gen_toks: 256, do_sample: false, temperature: 0}``
(sampling is refused), ``filter_list`` (``regex`` with ``regex_pattern`` / ``group_select`` /
``fallback``, and ``take_first``; see :mod:`deepwhale.eval.generative`) and ``metric_list``
with ``exact_match`` and its options (``ignore_case``, ``ignore_punctuation``,
``ignore_numbers``, ``regexes_to_ignore``). Each filter ``F`` reports ``exact_match_F`` (lm-eval
names it ``exact_match,F``); without a ``filter_list`` the metric is ``exact_match``.
``metric: pass_at_1`` instead runs ``context + response + "\n" + target`` (HumanEval: the
prompt, the completion, the tests and ``check(entry_point)``) in
:mod:`deepwhale.eval.sandbox` and scores 1 when it exits cleanly: greedy pass@1, as lm-eval's
``humaneval.yaml`` computes it with ``code_eval``.

``dataset_path: csv`` reads a CSV with a header row (every value a string). Groups of
subject tasks (C-Eval ``ceval``: 52 ``ceval-valid_<subject>`` tasks on the val split; CMMLU
``cmmlu``: 67 ``cmmlu_<subject>`` tasks on the test split; both 5-shot from dev with
``fewshot_config: {sampler: first_n}``, lm-eval 0.4.13's prompts) are generated from one group
file each, ``tasks/groups/*.yaml`` (see :mod:`deepwhale.eval.groups`); a subject name loads
here like any built-in task.

``data_files`` paths are relative to the data directory (default ``../shared/data/bench`` of
the repository, or ``$DEEPWHALE_EVAL_DATA``; ``--data-dir`` overrides). ``ppl:FILE`` is a
rolling log-likelihood task over a text file (one document) or a ``.json``/``.jsonl`` file of
``{"text": ...}`` documents.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from deepwhale.eval import templates
from deepwhale.eval.datasets import READERS, DataError
from deepwhale.eval.metrics import DEFAULT_MC, RESULT_PROCESSORS, ResultProcessor
from deepwhale.eval.preprocess import PROCESSORS

TASK_DIR = Path(__file__).resolve().parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until")
SUPPORTED_OUTPUT_TYPES = OUTPUT_TYPES
#: lm-eval 0.4.13's default ``max_gen_toks`` (``HFLM.max_gen_toks``)
MAX_GEN_TOKS = 256
_GEN_KEYS = ("until", "do_sample", "temperature", "max_gen_toks")
#: metrics of generate_until tasks: exact_match (lm-eval's), pass_at_1 (run the program)
GEN_METRICS = ("exact_match", "pass_at_1")
_EXACT_MATCH_KEYS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_seed
FEWSHOT_SAMPLERS = ("default", "first_n")  # lm-eval 0.4.13 api/samplers.py names


class TaskError(ValueError):
    """Bad task name, task file, template or data (the message says which file/key/doc)."""


def default_data_dir() -> Path:
    """``$DEEPWHALE_EVAL_DATA``, else the repository's ``../shared/data/bench``."""
    env = os.environ.get("DEEPWHALE_EVAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "bench"


@dataclass
class TaskConfig:
    """One task, as read from its YAML file (field meanings: the module docstring).

    Raises (from ``__post_init__``):
        TaskError: a missing or ill-typed key, naming the file and the key.
    """

    task: str
    output_type: str
    dataset_path: str = "json"
    data_files: dict[str, str] = field(default_factory=dict)
    test_split: str = "test"
    fewshot_split: str | None = None
    doc_to_text: str = ""
    doc_to_target: str | int = ""
    doc_to_choice: str | list | None = None
    process_docs: str | None = None
    process_results: str | None = None
    metric_list: list | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_config: dict | None = None
    generation_kwargs: dict | None = None
    filter_list: list | None = None
    source: str = "<memory>"

    def __post_init__(self) -> None:
        where = self.source

        def bad(key: str, why: str) -> TaskError:
            return TaskError(f"{where}: key {key!r}: {why}")

        if not isinstance(self.task, str) or not self.task:
            raise bad("task", "must be a non-empty string")
        if self.output_type not in OUTPUT_TYPES:
            raise bad("output_type", f"must be one of {', '.join(OUTPUT_TYPES)}")
        if self.dataset_path not in READERS:
            raise bad("dataset_path", f"must be one of {', '.join(READERS)}")
        if isinstance(self.data_files, str):
            self.data_files = {self.test_split: self.data_files}
        if not isinstance(self.data_files, dict) or not self.data_files:
            raise bad("data_files", "must be a file or a {split: file} mapping")
        if self.test_split not in self.data_files:
            raise bad("test_split", f"{self.test_split!r} is not a key of data_files")
        if self.fewshot_split is not None and self.fewshot_split not in self.data_files:
            raise bad("fewshot_split", f"{self.fewshot_split!r} is not a key of data_files")
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise bad("num_fewshot", "must be a non-negative integer")
        if self.num_fewshot and self.fewshot_split is None:
            raise bad("num_fewshot", "needs a fewshot_split")
        if self.fewshot_config is not None and (
            not isinstance(self.fewshot_config, dict)
            or set(self.fewshot_config) - {"sampler"}
            or self.fewshot_config.get("sampler", "default") not in FEWSHOT_SAMPLERS
        ):
            raise bad("fewshot_config", f"must be {{sampler: {' | '.join(FEWSHOT_SAMPLERS)}}}")
        if self.process_docs is not None and self.process_docs not in PROCESSORS:
            raise bad("process_docs", f"must be one of {', '.join(PROCESSORS)}")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise bad("doc_to_choice", "is required for multiple_choice")
        if self.process_results is not None and self.output_type != "multiple_choice":
            raise bad("process_results", "is only supported for multiple_choice tasks")
        if self.metric_list is not None and self.output_type == "loglikelihood_rolling":
            raise bad(
                "metric_list", "is only supported for multiple_choice and generate_until tasks"
            )
        for key in ("generation_kwargs", "filter_list"):
            if getattr(self, key) is not None and self.output_type != "generate_until":
                raise bad(key, "is only supported for generate_until tasks")
        if self.process_results is not None and self.process_results not in RESULT_PROCESSORS:
            raise bad("process_results", f"must be one of {', '.join(RESULT_PROCESSORS)}")
        if self.output_type == "generate_until":
            self._check_generative(bad)
        elif self.metric_list is not None:
            self._check_metric_list(bad)
        for key in ("doc_to_text", "target_delimiter", "fewshot_delimiter", "description"):
            if not isinstance(getattr(self, key), str):
                raise bad(key, "must be a string")
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            value = getattr(self, key)
            for source in value if isinstance(value, list) else [value]:
                if isinstance(source, str):
                    try:
                        templates.compile_template(source)
                    except Exception as e:  # jinja2.TemplateSyntaxError
                        raise bad(key, f"invalid template: {e}") from None

    def _check_metric_list(self, bad) -> None:
        computed = self.result_processor().metrics
        if not isinstance(self.metric_list, list) or not self.metric_list:
            raise bad("metric_list", "must be a non-empty list of {metric: NAME} mappings")
        for entry in self.metric_list:
            if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
                raise bad("metric_list", f"{entry!r} is not a {{metric: NAME}} mapping")
            extra = sorted(set(entry) - {"metric", "aggregation", "higher_is_better"})
            if extra:
                raise bad("metric_list", f"unknown key {extra[0]!r} in {entry!r}")
            if entry["metric"] not in computed:
                raise bad(
                    "metric_list",
                    f"metric {entry['metric']!r} is not computed (computed: {', '.join(computed)})",
                )
            if entry.get("aggregation", "mean") != "mean":
                raise bad("metric_list", f"aggregation of {entry['metric']!r} must be mean")
            if not isinstance(entry.get("higher_is_better", True), bool):
                raise bad("metric_list", f"higher_is_better of {entry['metric']!r}: a boolean")

    def _check_generative(self, bad) -> None:
        from deepwhale.eval.generative import build_filters

        kw = self.generation_kwargs if self.generation_kwargs is not None else {}
        if not isinstance(kw, dict):
            raise bad("generation_kwargs", "must be a mapping")
        extra = sorted(set(kw) - set(_GEN_KEYS))
        if extra:
            raise bad(
                "generation_kwargs", f"unknown key {extra[0]!r} (known: {', '.join(_GEN_KEYS)})"
            )
        until = kw.get("until", [])
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise bad("generation_kwargs", "until must be a string or a list of strings")
        if kw.get("do_sample", False) is not False:
            raise bad("generation_kwargs", "do_sample must be false (greedy decoding only)")
        temp = kw.get("temperature", 0.0)
        if isinstance(temp, bool) or not isinstance(temp, int | float) or temp != 0:
            raise bad("generation_kwargs", "temperature must be 0 (greedy decoding only)")
        toks = kw.get("max_gen_toks", MAX_GEN_TOKS)
        if isinstance(toks, bool) or not isinstance(toks, int) or toks < 1:
            raise bad("generation_kwargs", "max_gen_toks must be a positive integer")
        build_filters(self.filter_list, f"{self.source}: key 'filter_list'")
        for entry in self.metric_list or [{"metric": "exact_match"}]:
            if not isinstance(entry, dict) or entry.get("metric") not in GEN_METRICS:
                raise bad(
                    "metric_list",
                    f"{entry!r}: generate_until tasks compute {' or '.join(GEN_METRICS)}",
                )
            if entry["metric"] == "pass_at_1":
                extra = sorted(set(entry) - {"metric", "aggregation", "higher_is_better"})
                if extra:
                    raise bad("metric_list", f"unknown key {extra[0]!r} in {entry!r}")
                continue
            extra = sorted(
                set(entry) - {"metric", "aggregation", "higher_is_better", *_EXACT_MATCH_KEYS}
            )
            if extra:
                raise bad("metric_list", f"unknown key {extra[0]!r} in {entry!r}")
            if entry.get("aggregation", "mean") != "mean":
                raise bad("metric_list", "aggregation of 'exact_match' must be mean")
            rx = entry.get("regexes_to_ignore") or []
            if not isinstance(rx, list) or not all(isinstance(r, str) for r in rx):
                raise bad("metric_list", "regexes_to_ignore must be a list of patterns")
            for r in rx:
                try:
                    re.compile(r)
                except re.error as e:
                    raise bad(
                        "metric_list", f"regexes_to_ignore {r!r} does not compile: {e}"
                    ) from None

    def generation(self) -> tuple[list[str], int]:
        """``(until, max_gen_toks)`` of a generate_until task (checked at construction)."""
        kw = self.generation_kwargs or {}
        until = kw.get("until", [])
        return ([until] if isinstance(until, str) else list(until)), kw.get(
            "max_gen_toks", MAX_GEN_TOKS
        )

    def gen_metric(self) -> str:
        """``exact_match`` or ``pass_at_1`` (the first ``metric_list`` entry's)."""
        return (self.metric_list or [{"metric": "exact_match"}])[0]["metric"]

    def exact_match_options(self) -> dict:
        """exact_match keyword options from ``metric_list`` (lm-eval's ``ignore_case``...)."""
        entry = (self.metric_list or [{}])[0]
        return {k: entry[k] for k in _EXACT_MATCH_KEYS if k in entry}

    def result_processor(self) -> ResultProcessor:
        """The per-document metric function of a multiple-choice task: the one
        ``process_results`` names, else ``acc``/``acc_norm`` (names are checked at
        construction, so this does not raise)."""
        if self.process_results is None:
            return DEFAULT_MC
        return RESULT_PROCESSORS[self.process_results]

    def metric_names(self) -> tuple[str, ...]:
        """Names of the metrics a multiple-choice task reports (each with ``*_stderr``):
        ``metric_list``'s in order, else all that its processor computes."""
        if self.metric_list is None:
            return self.result_processor().metrics
        return tuple(dict.fromkeys(entry["metric"] for entry in self.metric_list))


def _read_task_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One task file's mapping with its ``include`` files merged in (lm-eval's order)."""
    import yaml

    if path.resolve() in seen:
        raise TaskError(f"{path}: include cycle ({' -> '.join(map(str, (*seen, path)))})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: invalid YAML: {e}") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read task file: {e}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a YAML mapping")
    if "include" not in raw:
        return raw
    includes = raw.pop("include")
    includes = includes if isinstance(includes, list) else [includes]
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str) or not inc:
            raise TaskError(f"{path}: key 'include': must be a file name or a list of them")
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        merged.update(_read_task_yaml(inc_path, (*seen, path.resolve())))
    merged.update(raw)
    return merged


def parse_task_file(path: Path) -> TaskConfig:
    """Read one task YAML file, with the files it includes.

    Raises:
        TaskError: unreadable YAML (with its line), not a mapping, an unknown key, a bad
            value, or an include cycle; every message starts with the file path (the included
            file's, for a problem inside it).
    """
    raw = _read_task_yaml(Path(path))
    known = {f.name for f in fields(TaskConfig)} - {"source"}
    unknown = sorted(set(raw) - known - {"metadata"})
    if unknown:
        raise TaskError(f"{path}: key {unknown[0]!r}: unknown (known: {', '.join(sorted(known))})")
    for key in ("task", "output_type"):
        if key not in raw:
            raise TaskError(f"{path}: key {key!r}: missing")
    raw.pop("metadata", None)
    return TaskConfig(**raw, source=str(path))


def builtin_tasks() -> dict[str, Path]:
    """Built-in task name -> its YAML file."""
    return {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}


def available_tasks() -> list[str]:
    """Names that :func:`load_task` accepts (``ppl:FILE`` stands for any file)."""
    from deepwhale.eval.groups import builtin_groups

    return [*builtin_tasks(), *builtin_groups(), "ppl:FILE"]


def load_task(name: str) -> TaskConfig:
    """A built-in task by name, a task YAML file by path, or ``ppl:FILE``.

    Raises:
        TaskError: an unknown name (the message lists the available tasks) or a bad file.
    """
    if name.startswith("ppl:"):
        file = name[4:]
        if not file:
            raise TaskError("ppl: needs a file, e.g. ppl:corpus.txt")
        reader = "json" if file.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) else "text"
        return TaskConfig(
            task=name,
            output_type="loglikelihood_rolling",
            dataset_path=reader,
            data_files={"test": file},
            doc_to_target="{{text}}",  # a document without "text" fails, naming its index
            source=name,
        )
    builtin = builtin_tasks()
    if name in builtin:
        return parse_task_file(builtin[name])
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return parse_task_file(Path(name))
    from deepwhale.eval.groups import find_subject  # C-Eval / CMMLU subjects

    subject = find_subject(name)
    if subject is not None:
        return subject
    raise TaskError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")


def _resolve(task: TaskConfig, split: str, data_dir: Path) -> Path:
    rel = Path(task.data_files[split])
    if rel.is_absolute():
        return rel
    if task.task.startswith("ppl:") and rel.exists():
        return rel  # ppl:FILE is relative to the working directory first
    return data_dir / rel


def load_docs(task: TaskConfig, split: str, data_dir: Path | None = None) -> list[dict]:
    """The processed documents of one split.

    Raises:
        TaskError: the data file is missing or malformed (names the task and the file), or a
            ``process_docs`` step fails.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = _resolve(task, split, data_dir)
    try:
        docs = READERS[task.dataset_path](path)
    except DataError as e:
        hint = "" if path.exists() else f" (data dir {data_dir}; set --data-dir)"
        raise TaskError(f"task {task.task}: {e}{hint}") from None
    if task.process_docs:
        try:
            docs = PROCESSORS[task.process_docs](docs)
        except (KeyError, TypeError, ValueError) as e:
            raise TaskError(
                f"task {task.task}: process_docs {task.process_docs!r} failed on {path}: "
                f"{type(e).__name__}: {e}"
            ) from None
    return docs


def _templated(task: TaskConfig, index: int, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # jinja2 UndefinedError, TypeError, TemplateError, ...
        raise TaskError(f"task {task.task}, doc {index}: {what}: {type(e).__name__}: {e}") from None


@dataclass
class Example:
    """One scored document: its context and, for multiple choice, choices and gold index."""

    index: int
    doc: dict
    context: str
    choices: list[str] | None = None
    gold: int | None = None
    text: str | None = None  # the rolling log-likelihood document


def target_text(task: TaskConfig, doc: dict, index: int) -> str:
    """The gold continuation of ``doc``: its choice text (multiple choice), else the rendered
    ``doc_to_target``. Raises TaskError naming the task and doc when a template fails."""
    target = _templated(
        task, index, "doc_to_target", templates.doc_to_target, task.doc_to_target, doc
    )
    if task.output_type == "multiple_choice":
        choices = _templated(
            task, index, "doc_to_choice", templates.doc_to_choice, task.doc_to_choice, doc
        )
        return choices[
            _templated(task, index, "doc_to_target", templates.gold_index, target, choices)
        ]
    return str(target[0] if isinstance(target, list) else target)


def build_examples(
    task: TaskConfig, docs: list[dict], fewshot_docs: list[dict] | None = None
) -> list[Example]:
    """Render every document (lm-eval's ``fewshot_context`` for ``num_fewshot`` examples).

    Few-shot examples are drawn as lm-eval's default sampler does: one ``random.Random(1234)``
    for the task, ``sample(fewshot_docs, n)`` per document, ``n + 1`` with the document itself
    removed when both come from the same split. ``fewshot_config: {sampler: first_n}`` takes
    the first ``n`` in file order instead (lm-eval's ``FirstNSampler``, the document removed).

    Raises:
        TaskError: a template failed (names the task and the document index).
    """
    rng = random.Random(FEWSHOT_SEED)
    same_split = task.fewshot_split == task.test_split
    out = []
    for i, doc in enumerate(docs):
        prefix = ""
        if task.description:  # lm-eval: a field name or template, joined with no delimiter
            prefix = _templated(
                task, i, "description", templates.doc_to_text, task.description, doc
            )
        if task.num_fewshot:
            pool = fewshot_docs or []
            k = task.num_fewshot + (1 if same_split else 0)
            sampler = (task.fewshot_config or {}).get("sampler", "default")
            if sampler == "first_n":
                shots = [s for s in pool if s is not doc][: task.num_fewshot]
            else:
                shots = rng.sample(pool, min(k, len(pool)))
            if same_split:
                shots = [s for s in shots if s is not doc][: task.num_fewshot]
            parts = []
            for j, shot in enumerate(shots):
                text = _templated(
                    task, j, "doc_to_text (fewshot)", templates.doc_to_text, task.doc_to_text, shot
                )
                parts.append(text + task.target_delimiter + target_text(task, shot, j))
            prefix += task.fewshot_delimiter.join(parts) + task.fewshot_delimiter
        if task.output_type == "loglikelihood_rolling":
            target = _templated(
                task, i, "doc_to_target", templates.doc_to_target, task.doc_to_target, doc
            )
            out.append(Example(i, doc, "", text=str(target)))
            continue
        context = prefix + _templated(
            task, i, "doc_to_text", templates.doc_to_text, task.doc_to_text, doc
        )
        if task.output_type == "multiple_choice":
            choices = _templated(
                task, i, "doc_to_choice", templates.doc_to_choice, task.doc_to_choice, doc
            )
            target = _templated(
                task, i, "doc_to_target", templates.doc_to_target, task.doc_to_target, doc
            )
            gold = _templated(task, i, "doc_to_target", templates.gold_index, target, choices)
            out.append(Example(i, doc, context, choices=choices, gold=gold))
        else:
            out.append(Example(i, doc, context))
    return out
