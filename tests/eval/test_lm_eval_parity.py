"""Acceptance: ``deepwhale eval`` equals lm-eval 0.4.x (``--model hf``) on the bundled
stories260K folder, for ARC-Easy and HellaSwag (acc, acc_norm, stderr) and a rolling
perplexity task (word/byte perplexity, bits per byte), 20 documents each, within 1e-4; and
lm-eval driving our engine (``model="deepwhale"``) gives our numbers.

The lm-eval tasks are lm-eval YAML equivalents of the built-in task files (see
``lm_eval_tasks.py``) fed the same documents.
"""

from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.eval import evaluate  # noqa: E402
from deepwhale.eval.datasets import read_hellaswag_text  # noqa: E402
from tests.eval.lm_eval_tasks import write_tasks  # noqa: E402
from tests.helpers import shared_data  # noqa: E402

N = 20
MC = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
PPL = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _ours(model_dir, folder, bench, n: int) -> dict:
    model = DeepSeekModel.from_pretrained(model_dir, device="cpu", dtype="float32")
    tasks = ["arc_easy", "hellaswag", f"ppl:{folder / 'ppl.jsonl'}"]
    res = evaluate(model, tasks, bench, limit=n, batch_size=8)["results"]
    return dict(zip(["dw_arc_easy", "dw_hellaswag", "dw_ppl"], res.values(), strict=True))


def _tasks(folder, n: int, texts: list[str]) -> None:
    bench = shared_data("bench")
    hs = read_hellaswag_text(bench / "hellaswag" / "hellaswag_val_full.txt.bz2")[:n]
    write_tasks(folder, bench / "arc_easy" / "test.json", hs, [{"text": t} for t in texts])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)
    corpus = shared_data("corpus", "en")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    story = (corpus / "tinystories" / "tinystories_sample.txt").read_text()
    texts = [t.strip() for t in story.split("<|endoftext|>") if t.strip()]
    texts.append((corpus / "tinyshakespeare" / "input.txt").read_text()[:4000])
    _tasks(folder, N, texts)
    return folder, _ours(DEFAULT_MODEL, folder, shared_data("bench"), N)


def _lm_eval(folder, model: str, model_args: str, n: int = N) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["dw_arc_easy", "dw_hellaswag", "dw_ppl"],
        limit=n,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        device="cpu",
        batch_size=4,
    )
    return {
        task: {k.split(",")[0]: v for k, v in res.items() if k.endswith(",none")}
        for task, res in out["results"].items()
    }


def _compare(ours: dict, theirs: dict) -> dict:
    """The largest relative difference per metric (and assert it is within 1e-4)."""
    diffs = {}
    for task, res in theirs.items():
        for key in MC if "ppl" not in task else PPL:
            a, b = ours[task][key], float(res[key])
            diffs[f"{task}/{key}"] = abs(a - b) / max(abs(b), 1e-12)
            assert a == pytest.approx(b, rel=1e-4, abs=1e-12), (task, key, a, b)
    return diffs


def test_matches_lm_eval_hf(setup, capsys):
    folder, ours = setup
    theirs = _lm_eval(folder, "hf", f"pretrained={DEFAULT_MODEL},dtype=float32")
    diffs = _compare(ours, theirs)
    assert ours["dw_ppl"]["samples"] == 6 and ours["dw_arc_easy"]["samples"] == N
    with capsys.disabled():
        print("\nparity vs lm-eval hf (max relative difference):", json.dumps(diffs, indent=1))


@pytest.mark.slow
def test_matches_lm_eval_hf_on_the_moe_demo(tmp_path):
    """The bundled deepwhale-demo (DeepSeek-V3 layout: MLA + MoE, byte-level BPE) against
    transformers' DeepseekV3 under lm-eval, with Chinese and English perplexity documents."""
    torch.set_num_threads(1)
    corpus = shared_data("corpus")
    texts = [
        (corpus / "zh" / "novels" / "hongloumeng.txt").read_text()[:3000],
        (corpus / "en" / "tinyshakespeare" / "input.txt").read_text()[:6000],
    ]
    demo = DEFAULT_MODEL.parent / "deepwhale-demo"
    _tasks(tmp_path, 10, texts)
    ours = _ours(demo, tmp_path, shared_data("bench"), 10)
    _compare(ours, _lm_eval(tmp_path, "hf", f"pretrained={demo},dtype=float32", n=10))


def test_lm_eval_drives_our_engine(setup):
    import deepwhale.eval.lm_eval_model  # noqa: F401  (registers "deepwhale")

    folder, ours = setup
    theirs = _lm_eval(folder, "deepwhale", f"pretrained={DEFAULT_MODEL},dtype=float32")
    _compare(ours, theirs)


FEWSHOT = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {bench}/arc_easy/test.json
    validation: {bench}/arc_easy/validation.json
test_split: test
fewshot_split: {split}
num_fewshot: 2
description: "{description}"
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
"""


@pytest.mark.parametrize("split", ["validation", "test"])
def test_fewshot_prompts_match_lm_eval(tmp_path, split):
    """2-shot ARC-Easy contexts equal lm-eval's ``fewshot_context`` (seed 1234), with shots from
    another split and from the scored split itself (the document never its own shot, and a
    templated ``description`` in front)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from deepwhale.eval.tasks import build_examples, load_docs, load_task

    bench = shared_data("bench")
    description = "Science questions ({{id}}).\n\n" if split == "test" else ""
    yaml_description = description.replace("\n", "\\n")  # a YAML double-quoted escape
    text = FEWSHOT.format(name="dw_fs", bench=bench, split=split, description=yaml_description)
    (tmp_path / "fs.yaml").write_text(text)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = get_task_dict(["dw_fs"], tm)["dw_fs"]
    task.set_fewshot_seed(1234)
    theirs = [task.fewshot_context(d, 2) for d in list(task.test_docs())[:8]]
    ours_task = load_task("arc_easy")
    ours_task.num_fewshot, ours_task.fewshot_split = 2, split
    ours_task.description = description
    test_docs = load_docs(ours_task, "test", bench)
    pool = test_docs if split == "test" else load_docs(ours_task, split, bench)
    ours = [e.context for e in build_examples(ours_task, test_docs[:8], pool)]
    assert ours == theirs


def test_hellaswag_preprocessing_is_lm_evals():
    """Our ``process_docs: hellaswag`` equals lm-eval's ``tasks/hellaswag/utils.process_docs``
    on the first 500 validation items."""
    datasets = pytest.importorskip("datasets")
    from lm_eval.tasks.hellaswag.utils import process_docs

    from deepwhale.eval.preprocess import hellaswag

    bench = shared_data("bench")
    docs = read_hellaswag_text(bench / "hellaswag" / "hellaswag_val_full.txt.bz2")[:500]
    theirs = list(process_docs(datasets.Dataset.from_list(docs)))
    assert hellaswag(docs) == theirs
