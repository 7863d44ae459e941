"""Task groups: one YAML file per benchmark that generates a task per subject, and the group
score aggregated over them as lm-eval 0.4.13 does (``lm_eval/api/metrics.py``
``aggregate_subtask_metrics`` and ``pooled_sample_stderr``; group files ``tasks/ceval/
_ceval-valid.yaml`` and ``tasks/cmmlu/_cmmlu.yaml``).

Built-in groups live in ``deepwhale/eval/tasks/groups/*.yaml`` (``ceval``: 52 C-Eval subjects,
``cmmlu``: 67 CMMLU subjects). A group file::

    group: cmmlu
    task_name: "cmmlu_{subject}"                     # a subject's task name
    description: "以下是关于{name}的单项选择题..."     # {subject} and {name} filled in
    data_files: {test: "cmmlu/test/{subject}.csv", dev: "cmmlu/dev/{subject}.csv"}
    task_template: {...}                             # every other task key (tasks.py)
    aggregate_metric_list: [{metric: acc, aggregation: mean, weight_by_size: true}]
    subjects: {agronomy: 农学, ...}                   # subject -> its name

Only ``str.format`` fields ``{subject}`` and ``{name}`` are filled in, and only in
``task_name``, ``description`` and ``data_files`` (the Jinja templates are left alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from deepwhale.eval.tasks import TASK_DIR, TaskConfig, TaskError

GROUP_DIR = TASK_DIR / "groups"
_KEYS = {"group", "task_name", "description", "data_files", "task_template"}
_KEYS |= {"aggregate_metric_list", "subjects", "metadata"}


@dataclass
class GroupConfig:
    """A group: its subject tasks (in the file's order) and the aggregated metrics.

    ``weights[m]`` is True when metric ``m`` is averaged weighted by subject size.
    """

    group: str
    tasks: list[TaskConfig]
    weights: dict[str, bool]
    source: str


def builtin_groups() -> dict[str, Path]:
    """Built-in group name -> its YAML file."""
    return {p.stem: p for p in sorted(GROUP_DIR.glob("*.yaml"))}


def _shorten(names: list[str], n: int = 8) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def parse_group_file(path: Path, only: str | None = None) -> GroupConfig:
    """Read a group file; ``only`` keeps just that subject task (by task name).

    Raises:
        TaskError: unreadable YAML, an unknown or missing key, a bad subject table, a
            ``{field}`` other than ``{subject}``/``{name}``, or a task key that
            :class:`~deepwhale.eval.tasks.TaskConfig` rejects; the message names the file.
    """
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot read group file: {e}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a group file must be a YAML mapping")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise TaskError(f"{path}: key {unknown[0]!r}: unknown (known: {', '.join(sorted(_KEYS))})")
    for key in ("group", "task_name", "task_template", "subjects"):
        if key not in raw:
            raise TaskError(f"{path}: key {key!r}: missing")
    subjects, template = raw["subjects"], raw["task_template"]
    if not isinstance(subjects, dict) or not subjects:
        raise TaskError(f"{path}: key 'subjects': must be a non-empty {{subject: name}} mapping")
    if not isinstance(template, dict):
        raise TaskError(f"{path}: key 'task_template': must be a mapping of task keys")
    weights = {}
    for entry in raw.get("aggregate_metric_list") or []:
        if not isinstance(entry, dict) or entry.get("aggregation", "mean") != "mean":
            raise TaskError(f"{path}: key 'aggregate_metric_list': {entry!r}: mean only")
        weights[str(entry.get("metric"))] = bool(entry.get("weight_by_size", True))
    tasks = []
    for subject, name in subjects.items():

        def fill(value, key: str, subject=subject, name=name):
            try:
                return str(value).format(subject=subject, name=name)
            except (KeyError, IndexError, ValueError) as e:
                raise TaskError(f"{path}: key {key!r}: bad {{field}}: {e}") from None

        task_name = fill(raw["task_name"], "task_name")
        if only is not None and task_name != only:
            continue
        keys = dict(template, task=task_name)
        if "description" in raw:
            keys["description"] = fill(raw["description"], "description")
        if "data_files" in raw:
            files = raw["data_files"]
            if not isinstance(files, dict):
                raise TaskError(f"{path}: key 'data_files': must be a {{split: file}} mapping")
            keys["data_files"] = {k: fill(v, "data_files") for k, v in files.items()}
        try:
            tasks.append(TaskConfig(**keys, source=f"{path} [{task_name}]"))
        except TypeError as e:  # an unknown task key in task_template
            raise TaskError(f"{path}: key 'task_template': {e}") from None
    for metric in weights:
        if tasks and metric not in tasks[0].metric_names():
            raise TaskError(f"{path}: key 'aggregate_metric_list': {metric!r} is not reported")
    return GroupConfig(str(raw["group"]), tasks, weights, str(path))


def subject_names(path: Path) -> list[str]:
    """The subject task names of a group file, without building the tasks."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [raw["task_name"].format(subject=s, name=n) for s, n in raw["subjects"].items()]


def find_subject(name: str) -> TaskConfig | None:
    """The built-in subject task ``name`` (e.g. ``cmmlu_anatomy``), else None.

    Raises:
        TaskError: ``name`` has a group's prefix but is not one of its subjects (the message
            lists some of them), or the group file is bad.
    """
    for path in builtin_groups().values():
        names = subject_names(path)
        if name in names:
            return parse_group_file(path, only=name).tasks[0]
        prefix = names[0].split("_")[0] + "_"  # "cmmlu_", "ceval-valid_"
        if name.startswith(prefix):
            raise TaskError(
                f"unknown subject {name!r} of group {path.stem}; available: {_shorten(names)}"
            )
    return None


def load_group(name: str) -> GroupConfig | None:
    """A built-in group by name (``ceval``, ``cmmlu``) or a group file by path, else None."""
    builtin = builtin_groups()
    if name in builtin:
        return parse_group_file(builtin[name])
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        import yaml

        try:
            raw = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return None
        if isinstance(raw, dict) and "group" in raw:
            return parse_group_file(Path(name))
    return None


def resolve(name: str) -> TaskConfig | GroupConfig:
    """A group (built-in name or group file) or else a task (:func:`tasks.load_task`).

    Raises:
        TaskError: as :func:`~deepwhale.eval.tasks.load_task` and :func:`parse_group_file`.
    """
    from deepwhale.eval.tasks import load_task

    return load_group(name) or load_task(name)


def aggregate(results: list[dict], weights: dict[str, bool]) -> dict:
    """The group line from its subjects' results (each ``{metric, metric_stderr, samples}``).

    lm-eval 0.4.13: the value is ``sum(m_i * n_i) / sum(n_i)`` (``n_i = 1`` when not weighted
    by size); the stderr, weighted, the pooled one ``sqrt(sum((n_i - 1) n_i se_i^2) /
    (sum(n_i) - k) / sum(n_i))``, unweighted ``sqrt(sum(se_i^2)) / k``. A subject with a NaN
    stderr (one sample) makes the group's NaN; ``sum(n_i) == k`` gives NaN too.
    """
    sizes = [r["samples"] for r in results]
    out: dict = {}
    for metric, by_size in weights.items():
        values = [r[metric] for r in results]
        errs = [r[f"{metric}_stderr"] for r in results]
        w = sizes if by_size else [1] * len(sizes)
        out[metric] = sum(v * n for v, n in zip(values, w, strict=True)) / sum(w)
        k, total = len(sizes), sum(sizes)
        if by_size:
            pooled = sum((n - 1) * e * e * n for n, e in zip(sizes, errs, strict=True))
            out[f"{metric}_stderr"] = (
                math.sqrt(pooled / (total - k) / total) if total > k else math.nan
            )
        else:
            out[f"{metric}_stderr"] = math.sqrt(sum(e * e for e in errs)) / k
    out["samples"] = sum(sizes)
    out["subtasks"] = len(results)
    return out
