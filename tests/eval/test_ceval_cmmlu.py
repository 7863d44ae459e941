"""C-Eval and CMMLU: the CSV reader against pandas, the group aggregation against lm-eval's own
functions, 5-shot prompts and scores against lm-eval 0.4.13 running its own task files
(``tasks/ceval/ceval-valid_<subject>.yaml``, ``tasks/cmmlu/cmmlu_<subject>.yaml``, only the Hub
dataset swapped for the shared CSVs) under ``--model hf`` on stories260K, and the CLI's errors.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepwhale.cli import app
from deepwhale.eval.datasets import read_csv_docs
from deepwhale.eval.groups import aggregate, load_group
from deepwhale.eval.tasks import TaskError, build_examples, load_docs, load_task
from tests.helpers import shared_data

LIMIT = 3
SUBJECTS = {
    "ceval": ["ceval-valid_computer_network", "ceval-valid_middle_school_physics"],
    "cmmlu": ["cmmlu_anatomy", "cmmlu_agronomy"],
}

LM_SUBJECT = """include: {lm_yaml}
task: dw_{name}
dataset_path: csv
dataset_name: null
dataset_kwargs:
  data_files:
    {test}: {test_csv}
    dev: {dev_csv}
"""

LM_GROUP = """group: dw_{group}
task: [{tasks}]
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
  - metric: acc_norm
    aggregation: mean
    weight_by_size: true
"""


def _same_columns(dev: Path, out: Path) -> Path:
    """``dev`` without C-Eval's ``explanation`` column: HF's csv builder needs every split of a
    dataset to have the same columns (the Hub's ceval-exam configs drop it the same way)."""
    import csv

    with dev.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows[0][-1] == "explanation":
        rows = [r[:-1] for r in rows]
    with out.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return out


def _write_lm_eval_tasks(folder: Path) -> None:
    """lm-eval's own subject files on the shared CSVs, and one group per benchmark (lm-eval's
    group yaml with only our subjects)."""
    from lm_eval import tasks as lm_tasks

    lm_dir = Path(lm_tasks.__path__[0])
    for group, names in SUBJECTS.items():
        for name in names:
            task = load_task(name)
            test = task.test_split
            text = LM_SUBJECT.format(
                lm_yaml=lm_dir / group / f"{name}.yaml",
                name=name,
                test=test,
                test_csv=shared_data("bench", task.data_files[test]),
                dev_csv=_same_columns(
                    shared_data("bench", task.data_files["dev"]), folder / f"{name}_dev.csv"
                ),
            )
            (folder / f"dw_{name}.yaml").write_text(text, encoding="utf-8")
        tasks = ", ".join(f"dw_{n}" for n in names)
        (folder / f"dw_{group}.yaml").write_text(LM_GROUP.format(group=group, tasks=tasks))


def test_csv_reader_equals_pandas_as_strings():
    pd = pytest.importorskip("pandas")
    bench = shared_data("bench")
    for path in [
        bench / "cmmlu" / "test" / "anatomy.csv",
        bench / "ceval" / "val" / "computer_network_val.csv",
        bench / "ceval" / "dev" / "computer_network_dev.csv",
    ]:
        theirs = pd.read_csv(path, dtype=str, keep_default_na=False)
        theirs = theirs.rename(columns={"Unnamed: 0": ""}).to_dict("records")
        assert read_csv_docs(path) == theirs


def test_group_aggregation_equals_lm_evals():
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    rng = random.Random(0)
    for _ in range(50):
        k = rng.randint(1, 6)
        res = [
            {"acc": rng.random(), "acc_stderr": rng.random() / 5, "samples": rng.randint(2, 300)}
            for _ in range(k)
        ]
        ours = aggregate(res, {"acc": True})
        sizes = [r["samples"] for r in res]
        acc = aggregate_subtask_metrics([r["acc"] for r in res], sizes, True)
        err = pooled_sample_stderr([r["acc_stderr"] for r in res], sizes)
        assert ours["acc"] == pytest.approx(acc, rel=1e-12)
        assert ours["acc_stderr"] == pytest.approx(err, rel=1e-12)
        assert ours["samples"] == sum(sizes) and ours["subtasks"] == k
    # hand-computed: 2 subjects of 3 docs, acc 1/3 and 2/3 -> 0.5
    res = [{"acc": 1 / 3, "acc_stderr": 1 / 3, "samples": 3}] * 2
    assert aggregate(res, {"acc": False})["acc_stderr"] == pytest.approx((2 / 9) ** 0.5 / 2)


def test_groups_list_every_subject_and_the_prompt_is_5_shot():
    ceval, cmmlu = load_group("ceval"), load_group("cmmlu")
    assert len(ceval.tasks) == 52 and len(cmmlu.tasks) == 67
    assert ceval.weights == cmmlu.weights == {"acc": True, "acc_norm": True}
    task = load_task("cmmlu_anatomy")
    assert task.num_fewshot == 5 and task.test_split == "test"
    bench = shared_data("bench")
    docs, dev = load_docs(task, "test", bench), load_docs(task, "dev", bench)
    ex = build_examples(task, docs[:1], dev)[0]
    assert ex.context.startswith("以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n")
    assert ex.context.count("答案：") == 6 and ex.context.endswith("D. 乳腺\n答案：")
    assert ex.choices == ["A", "B", "C", "D"] and ex.gold == 0


def test_a_copied_group_file_overrides_the_builtin(tmp_path):
    import yaml

    from deepwhale.eval.groups import GROUP_DIR

    raw = yaml.safe_load((GROUP_DIR / "cmmlu.yaml").read_text(encoding="utf-8"))
    raw["group"], raw["subjects"] = "my_cmmlu", {"anatomy": "解剖学", "arts": "艺术学"}
    raw["task_template"]["num_fewshot"] = 1
    path = tmp_path / "my_cmmlu.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    g = load_group(str(path))
    assert g.group == "my_cmmlu" and [t.task for t in g.tasks] == ["cmmlu_anatomy", "cmmlu_arts"]
    assert g.tasks[1].description.startswith("以下是关于艺术学的") and g.tasks[0].num_fewshot == 1
    raw["task_template"]["fewshot_config"] = {"sampler": "balanced"}
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(TaskError, match=r"key 'fewshot_config': must be \{sampler: default"):
        load_group(str(path))


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from deepwhale.api import DEFAULT_MODEL

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("lm_eval_cn")
    _write_lm_eval_tasks(folder)
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={DEFAULT_MODEL},dtype=float32",
        tasks=["dw_ceval", "dw_cmmlu"],
        num_fewshot=5,
        limit=LIMIT,
        task_manager=tm,
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    return folder, tm, out


@pytest.mark.slow  # about 20 s on 2 cores: lm-eval's run is the bulk
def test_prompts_and_scores_match_lm_eval(lm_eval_run, tmp_path):
    import torch

    from deepwhale.api import DEFAULT_MODEL, DeepSeekModel
    from deepwhale.eval import evaluate

    torch.set_num_threads(1)
    _, _, out = lm_eval_run
    bench = shared_data("bench")
    model = DeepSeekModel.from_pretrained(DEFAULT_MODEL, device="cpu", dtype="float32")
    names = [n for ns in SUBJECTS.values() for n in ns]
    ours = evaluate(model, names, bench, limit=LIMIT, batch_size=4, log_samples=True)
    for name in names:  # the rendered 5-shot prompts, and every score
        theirs = sorted(out["samples"][f"dw_{name}"], key=lambda s: s["doc_id"])
        contexts = [s["arguments"][0][0] for s in theirs]
        assert [s["context"] for s in ours["samples"][name]] == contexts, name
        for mine, their in zip(ours["samples"][name], theirs, strict=True):  # per choice
            lls = [float(r[0]) for r in their["filtered_resps"]]
            assert mine["logprobs"] == pytest.approx(lls, rel=1e-4, abs=1e-4), name
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            b = out["results"][f"dw_{name}"][f"{key},none"]
            assert ours["results"][name][key] == pytest.approx(b, rel=1e-4, abs=1e-12), name
    # the groups: run through `deepwhale eval` semantics with the two subjects each
    for group, subjects in SUBJECTS.items():
        g = load_group(group)
        g.tasks = [t for t in g.tasks if t.task in subjects]
        res = evaluate(model, [g], bench, limit=LIMIT, batch_size=4)["results"]
        assert list(res) == [group, *(t.task for t in g.tasks)]  # the group line first
        theirs = out["results"][f"dw_{group}"]
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            b = theirs[f"{key},none"]
            assert res[group][key] == pytest.approx(b, rel=1e-4, abs=1e-12), (group, key)
        assert res[group]["samples"] == LIMIT * len(subjects)


def test_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-t", "cmmlu_nope"])
    assert res.exit_code == 2
    assert "unknown subject 'cmmlu_nope' of group cmmlu; available: cmmlu_agronomy," in res.output
    assert "(59 more)" in res.output
    res = runner.invoke(app, ["eval", "-t", "ceval-valid_x", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "ceval-valid_computer_network" in res.output
    res = runner.invoke(app, ["eval", "-t", "cmmlu_anatomy", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2
    assert f"data file not found: {tmp_path / 'cmmlu' / 'test' / 'anatomy.csv'}" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"bad.csv:3: 1 fields, the header has 2"):
        read_csv_docs(bad)
    with pytest.raises(TaskError, match="unknown task"):
        load_task("mmlu_anatomy")
