"""generate_until: the built-in gsm8k task against lm-eval 0.4.13's own gsm8k.yaml (``--model
hf``), on the bundled stories260K: the same greedy responses, filtered answers and exact_match.

5-shot prompts are longer than stories260K's 512-token context minus lm-eval's 256 generated
tokens, so this also checks the left truncation of generative prompts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.eval import evaluate  # noqa: E402
from deepwhale.eval.gen_runner import metric_name  # noqa: E402
from deepwhale.eval.tasks import TaskConfig, TaskError, load_task  # noqa: E402
from tests.helpers import shared_data  # noqa: E402

N = 4

WRAPPER = """include: {upstream}
task: dw_gsm8k
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {bench}/gsm8k/test.jsonl
    train: {bench}/gsm8k/train.jsonl
"""


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.from_pretrained(device="cpu")


def _lm_eval(tmp_path: Path, shots: int) -> dict:
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    upstream = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    bench = shared_data("bench")
    (tmp_path / "dw_gsm8k.yaml").write_text(WRAPPER.format(upstream=upstream, bench=bench))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={DEFAULT_MODEL},dtype=float32",
        tasks=["dw_gsm8k"],
        num_fewshot=shots,
        limit=N,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        device="cpu",
        batch_size=1,
        log_samples=True,
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 5])
def test_gsm8k_matches_lm_eval_hf(model, tmp_path, shots):
    theirs = _lm_eval(tmp_path, shots)
    ours = evaluate(model, ["gsm8k"], limit=N, num_fewshot=shots, batch_size=2, log_samples=True)
    mine = {s["doc_index"]: s for s in ours["samples"]["gsm8k"]}
    compared = 0
    for s in theirs["samples"]["dw_gsm8k"]:
        me = mine[s["doc_id"]]
        assert me["response"] == s["resps"][0][0], s["doc_id"]
        assert me[f"filtered_{s['filter']}"] == s["filtered_resps"][0]
        compared += 1
    assert compared == 2 * N  # two filters per document
    for filt in ("strict-match", "flexible-extract"):
        want = theirs["results"]["dw_gsm8k"][f"exact_match,{filt}"]
        assert ours["results"]["gsm8k"][metric_name(filt)] == pytest.approx(want)
    assert any(s["response"].strip() for s in mine.values())


def test_answers_do_not_depend_on_batch_size(model):
    one = evaluate(model, ["gsm8k"], limit=3, num_fewshot=1, batch_size=1, log_samples=True)
    three = evaluate(model, ["gsm8k"], limit=3, num_fewshot=1, batch_size=3, log_samples=True)
    assert [s["response"] for s in one["samples"]["gsm8k"]] == [
        s["response"] for s in three["samples"]["gsm8k"]
    ]
    assert one["results"] == three["results"]


def test_gsm8k_task_file():
    task = load_task("gsm8k")
    assert task.output_type == "generate_until" and task.num_fewshot == 5
    assert task.generation() == (["Question:", "</s>", "<|im_end|>"], 256)
    assert task.exact_match_options()["ignore_case"] is True


def _gen(**kw) -> TaskConfig:
    return TaskConfig(
        task="t",
        output_type="generate_until",
        data_files={"test": "x.jsonl"},
        source="t.yaml",
        **kw,
    )


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"generation_kwargs": {"do_sample": True}}, "do_sample must be false"),
        ({"generation_kwargs": {"temperature": 0.7}}, "temperature must be 0"),
        ({"generation_kwargs": {"max_gen_toks": 0}}, "max_gen_toks must be a positive"),
        ({"generation_kwargs": {"top_p": 0.9}}, "unknown key 'top_p'"),
        ({"generation_kwargs": {"until": [1]}}, "until must be a string or a list"),
        ({"filter_list": [{"name": "x", "filter": [{"function": "nope"}]}]}, "unknown filter"),
        (
            {
                "filter_list": [
                    {"name": "x", "filter": [{"function": "regex", "regex_pattern": "("}]}
                ]
            },
            "does not compile",
        ),
        ({"metric_list": [{"metric": "acc"}]}, "exact_match or pass_at_1"),
        (
            {"metric_list": [{"metric": "exact_match", "regexes_to_ignore": ["("]}]},
            "does not compile",
        ),
        ({"metric_list": [{"metric": "exact_match", "ignore_whitespace": True}]}, "unknown key"),
    ],
)
def test_bad_generative_task_files_name_the_file_and_key(kw, words):
    with pytest.raises(TaskError, match=words) as e:
        _gen(**kw)
    assert "t.yaml" in str(e.value)


def test_filter_keys_only_on_generative_tasks():
    with pytest.raises(TaskError, match="filter_list.*only supported for generate_until"):
        TaskConfig(
            task="t",
            output_type="multiple_choice",
            doc_to_choice="{{c}}",
            data_files={"test": "x"},
            filter_list=[],
        )


def test_no_room_for_a_prompt(model, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"q": "hi", "a": "1"}\n')
    task = _gen(
        doc_to_text="{{q}}",
        doc_to_target="{{a}}",
        generation_kwargs={"max_gen_toks": 512},
    )
    with pytest.raises(TaskError, match="leaves no room for a prompt"):
        evaluate(model, [task], tmp_path)


@pytest.mark.slow
def test_lm_eval_drives_our_generation(tmp_path):
    """lm-eval with ``model="deepwhale"`` on its own gsm8k.yaml: the same responses as hf."""
    from lm_eval.tasks import TaskManager

    import deepwhale.eval.lm_eval_model  # noqa: F401  (registers "deepwhale")

    hf = _lm_eval(tmp_path, 1)
    out = lm_eval.simple_evaluate(
        model="deepwhale",
        model_args=f"pretrained={DEFAULT_MODEL},dtype=float32",
        tasks=["dw_gsm8k"],
        num_fewshot=1,
        limit=N,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    ours = {(s["doc_id"], s["filter"]): s["resps"] for s in out["samples"]["dw_gsm8k"]}
    theirs = {(s["doc_id"], s["filter"]): s["resps"] for s in hf["samples"]["dw_gsm8k"]}
    assert ours == theirs and len(ours) == 2 * N
