"""lm-eval task folders equivalent to deepwhale's built-in tasks, written for a test run.

The YAML below is lm-eval 0.4.x's own format (``dataset_path: json`` + ``dataset_kwargs``);
HellaSwag uses lm-eval's own ``process_docs`` (``lm_eval.tasks.hellaswag.utils``).
"""

from __future__ import annotations

import json
from pathlib import Path

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
