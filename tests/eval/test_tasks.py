"""Task files and their bad-input messages: unknown task, malformed YAML (file and key), a
template failing (task and doc index), a missing data file."""

from __future__ import annotations

import json

import pytest

from deepwhale.eval.datasets import read_hellaswag_text
from deepwhale.eval.tasks import (
    TaskError,
    available_tasks,
    build_examples,
    load_docs,
    load_task,
    parse_task_file,
)
from tests.helpers import shared_data


def test_builtin_tasks_render_lm_eval_prompts():
    bench = shared_data("bench")
    assert {"arc_easy", "hellaswag", "ppl:FILE"} <= set(available_tasks())
    arc = load_task("arc_easy")
    docs = load_docs(arc, "test", bench)[:3]
    ex = build_examples(arc, docs)[0]
    assert ex.context == f"Question: {docs[0]['question']}\nAnswer:"
    assert ex.choices == docs[0]["choices"]["text"]
    assert (
        ex.choices[ex.gold]
        == docs[0]["choices"]["text"][docs[0]["choices"]["label"].index(docs[0]["answerKey"])]
    )
    hs = load_task("hellaswag")
    raw = read_hellaswag_text(bench / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(raw) == 10042 and raw[0]["label"] == "3"
    ex = build_examples(hs, load_docs(hs, "validation", bench)[:1])[0]
    assert ex.context.startswith("Roof shingle removal: ") and ex.gold == 3
    assert len(ex.choices) == 4 and "  " not in ex.context


def test_fewshot_context_uses_delimiters(tmp_path):
    arc = load_task("arc_easy")
    arc.num_fewshot = 2
    bench = shared_data("bench")
    shots = load_docs(arc, "validation", bench)
    ex = build_examples(arc, load_docs(arc, "test", bench)[:1], shots)[0]
    parts = ex.context.split("\n\n")
    assert len(parts) == 3 and parts[0].startswith("Question: ") and "\nAnswer: " in parts[0]


def test_unknown_task_lists_available():
    with pytest.raises(
        TaskError, match=r"unknown task 'nope'; available: arc_easy, gsm8k, hellaswag, humaneval"
    ):
        load_task("nope")


def _write(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_file_and_key(tmp_path):
    base = "task: t\ndataset_path: json\ndata_files: x.json\noutput_type: multiple_choice\n"
    cases = {
        "task: [unclosed\n": "invalid YAML",
        "- a list\n": "must be a YAML mapping",
        base + "doc_to_choice: c\ncolour: red\n": "key 'colour': unknown",
        base.replace("multiple_choice", "ranking") + "doc_to_choice: c\n": "key 'output_type'",
        base: "key 'doc_to_choice': is required",
        base
        + "doc_to_choice: c\ndoc_to_text: '{{ broken'\n": "key 'doc_to_text': invalid template",
        base + "doc_to_choice: c\nnum_fewshot: 2\n": "key 'num_fewshot': needs a fewshot_split",
        base + "doc_to_choice: c\nprocess_docs: mystery\n": "key 'process_docs'",
        base + "doc_to_choice: c\nprocess_results: mystery\n": "key 'process_results'",
        base + "doc_to_choice: c\nmetric_list: acc\n": "key 'metric_list': must be a non-empty",
        base + "doc_to_choice: c\nmetric_list: [acc]\n": "key 'metric_list': 'acc' is not a",
        base + "doc_to_choice: c\nmetric_list: [{metric: f1}]\n": "'f1' is not computed",
        base + "doc_to_choice: c\nmetric_list: [{metric: acc, aggregation: median}]\n": "mean",
        base + "doc_to_choice: c\nmetric_list: [{metric: acc, k: 1}]\n": "unknown key 'k'",
        "task: t\ndata_files: x.txt\noutput_type: loglikelihood_rolling\n"
        "metric_list: [{metric: acc}]\n": "key 'metric_list': is only supported for multiple",
        "include: t.yaml\n": "include cycle",
        "include: [3]\n": "key 'include'",
        "dataset_path: json\n": "key 'task': missing",
    }
    for text, message in cases.items():
        path = _write(tmp_path, text)
        with pytest.raises(TaskError) as info:
            parse_task_file(path)
        assert str(info.value).startswith(str(path)) and message in str(info.value), text


def test_include_and_metric_list(tmp_path):
    """``include`` merges another file's keys under this one's (lm-eval's order, relative to
    the including file); ``metric_list`` picks the reported metrics."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "a", "c": ["x", "y"], "g": 1}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "task: base\ndata_files: d.jsonl\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: c\ndoc_to_target: g\n"
    )
    (tmp_path / "sub" / "child.yaml").write_text(
        "include: ../base.yaml\ntask: child\nmetric_list: [{metric: acc_norm}]\n"
    )
    base, child = (
        load_task(str(tmp_path / "base.yaml")),
        load_task(str(tmp_path / "sub/child.yaml")),
    )
    assert base.metric_names() == ("acc", "acc_norm") and child.metric_names() == ("acc_norm",)
    assert (child.task, child.doc_to_text, child.source) == (
        "child",
        "{{q}}",
        str(tmp_path / "sub" / "child.yaml"),
    )
    (tmp_path / "missing.yaml").write_text("include: nowhere.yaml\ntask: m\n")
    with pytest.raises(TaskError, match=r"nowhere.yaml: cannot read task file"):
        load_task(str(tmp_path / "missing.yaml"))


def test_template_failure_names_task_and_doc(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"q": "a", "c": ["x", "y"], "g": 0}) + "\n" + json.dumps({"c": ["x"], "g": 0})
    )
    path = _write(
        tmp_path,
        "task: mine\ndata_files: d.jsonl\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: c\ndoc_to_target: g\n",
    )
    task = load_task(str(path))
    docs = load_docs(task, "test", tmp_path)
    with pytest.raises(TaskError, match=r"task mine, doc 1: doc_to_text: UndefinedError: 'q'"):
        build_examples(task, docs)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(
        TaskError, match=r"task arc_easy: data file not found: .*arc_easy/test.json"
    ):
        load_docs(load_task("arc_easy"), "test", tmp_path)
    with pytest.raises(TaskError, match="data file not found"):
        load_docs(load_task("ppl:nowhere.txt"), "test", tmp_path)


def test_generative_task_from_a_minimal_file(tmp_path):
    """A generate_until file with no generation keys: lm-eval's defaults (no stop strings,
    256 new tokens, exact_match with no filter)."""
    from deepwhale.eval.runner import prepare

    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "2+2?"}) + "\n")
    path = _write(
        tmp_path, "task: gen\ndata_files: d.jsonl\noutput_type: generate_until\ndoc_to_text: q\n"
    )
    task = load_task(str(path))
    assert task.generation() == ([], 256) and task.exact_match_options() == {}
    prep = prepare(task, None, 512, tmp_path)
    assert prep.requests == [] and [ex.context for ex in prep.examples] == ["2+2?"]  # a field name


def test_ppl_file_errors(tmp_path):
    from deepwhale.api import DeepSeekModel
    from deepwhale.eval import evaluate

    (tmp_path / "docs.jsonl").write_text('{"text": "Once upon a time"}\n{"body": "no text"}\n')
    task = load_task(f"ppl:{tmp_path / 'docs.jsonl'}")
    with pytest.raises(TaskError, match=r"doc 1: doc_to_target: UndefinedError: 'text'"):
        build_examples(task, load_docs(task, "test", tmp_path))
    (tmp_path / "empty.txt").write_text("")
    model = DeepSeekModel.from_pretrained(device="cpu")
    with pytest.raises(TaskError, match=r"task ppl:.*empty.txt: empty corpus"):
        evaluate(model, [f"ppl:{tmp_path / 'empty.txt'}"])
