"""lm-eval task folders equivalent to deepwhale's built-in tasks, written for a test run.

The YAML below is lm-eval 0.4.x's own format (``dataset_path: json`` + ``dataset_kwargs``);
HellaSwag uses lm-eval's own ``process_docs`` (``lm_eval.tasks.hellaswag.utils``); the
TruthfulQA tasks *include* lm-eval's own ``truthfulqa_mc1.yaml`` / ``truthfulqa_mc2.yaml``
(prompt, choices, ``process_results_mc2``) and only swap the Hub dataset for a local file.
"""

from __future__ import annotations

import json
from pathlib import Path

TRUTHFULQA = """include: {lm_eval_yaml}
task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
"""

ARC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

HELLASWAG = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

PPL = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "text"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_tasks(folder: Path, arc_json: Path, hellaswag_docs: list[dict], ppl_docs: list[dict]):
    """Write ``dw_arc_easy``, ``dw_hellaswag`` and ``dw_ppl`` lm-eval tasks under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    hs, ppl = folder / "hellaswag.jsonl", folder / "ppl.jsonl"
    hs.write_text("".join(json.dumps(d) + "\n" for d in hellaswag_docs))
    ppl.write_text("".join(json.dumps(d) + "\n" for d in ppl_docs))
    (folder / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs\n")
    (folder / "dw_arc_easy.yaml").write_text(ARC.format(name="dw_arc_easy", data=arc_json))
    (folder / "dw_hellaswag.yaml").write_text(HELLASWAG.format(name="dw_hellaswag", data=hs))
    (folder / "dw_ppl.yaml").write_text(PPL.format(name="dw_ppl", data=ppl))


def write_truthfulqa_tasks(folder: Path, mc_task_json: Path, n: int) -> None:
    """Write ``dw_truthfulqa_mc1`` / ``dw_truthfulqa_mc2``: lm-eval's own task files on the first
    ``n`` items of upstream ``mc_task.json``, put in the HF ``truthful_qa/multiple_choice``
    schema the way the HF dataset builder does (``choices = list(targets)``, ``labels =
    list(targets.values())``)."""
    from lm_eval.tasks import truthfulqa

    folder.mkdir(parents=True, exist_ok=True)
    items = json.loads(mc_task_json.read_text(encoding="utf-8"))[:n]
    rows = [
        {
            "question": item["question"],
            **{
                key: {"choices": list(item[key]), "labels": list(item[key].values())}
                for key in ("mc1_targets", "mc2_targets")
            },
        }
        for item in items
    ]
    data = folder / "truthfulqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lm_dir = Path(truthfulqa.__path__[0])
    for which in ("mc1", "mc2"):
        name = f"dw_truthfulqa_{which}"
        text = TRUTHFULQA.format(
            lm_eval_yaml=lm_dir / f"truthfulqa_{which}.yaml", name=name, data=data
        )
        (folder / f"{name}.yaml").write_text(text)
