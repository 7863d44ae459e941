"""Named ``process_docs`` steps a task file may ask for (``process_docs: NAME``).

Each one gives the documents the fields lm-eval 0.4.x's own task sees: a re-statement of the
task's ``process_docs`` (``hellaswag``), or of the Hugging Face dataset's conversion when the
shared copy is the upstream file (``truthfulqa_mc``), so scores match.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval ``tasks/hellaswag/utils.py`` ``preprocess``: strip, `` [title]`` -> ``. ``,
    drop ``[...]`` markers, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag(docs: list[dict]) -> list[dict]:
    """lm-eval ``hellaswag`` ``process_docs``: ``query = preprocess(activity_label + ": " +
    ctx_a + " " + ctx_b.capitalize())``, ``choices = [preprocess(e) for e in endings]``,
    ``gold = int(label)``; other fields are kept."""
    out = []
    for doc in docs:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out.append(
            {
                **doc,
                "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"]),
            }
        )
    return out


def _mc_targets(targets, where: str) -> dict:
    """One TruthfulQA ``mc*_targets`` field in the HF schema ``{"choices", "labels"}``."""
    if isinstance(targets, dict) and set(targets) == {"choices", "labels"}:
        if isinstance(targets["choices"], list) and isinstance(targets["labels"], list):
            choices, labels = targets["choices"], targets["labels"]  # already the HF schema
        else:
            choices, labels = list(targets), list(targets.values())
    elif isinstance(targets, dict):
        choices, labels = list(targets), list(targets.values())  # upstream {answer: label}
    else:
        raise TypeError(f"{where} is {type(targets).__name__}, not an {{answer: label}} object")
    if not choices or len(choices) != len(labels):
        raise ValueError(f"{where}: {len(choices)} choices for {len(labels)} labels")
    if any(not isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: a choice is not a string")
    if any(type(v) is not int or v not in (0, 1) for v in labels):
        raise ValueError(f"{where}: labels must be 0 or 1, got {labels}")
    return {"choices": choices, "labels": labels}


def truthfulqa_mc(docs: list[dict]) -> list[dict]:
    """TruthfulQA ``data/mc_task.json`` items in the Hugging Face ``truthful_qa/multiple_choice``
    schema that lm-eval 0.4.13's ``truthfulqa_mc1`` / ``truthfulqa_mc2`` read.

    Upstream stores each of ``mc0_targets``, ``mc1_targets`` and ``mc2_targets`` as an object
    ``{answer: 1 | 0}`` (true answers first); the HF dataset keeps the same order as two lists,
    ``{"choices": [answer, ...], "labels": [1 | 0, ...]}``. Items already in that schema pass
    through unchanged. Answers are not edited (no stripping, empty strings kept); other fields
    are kept.

    Raises:
        KeyError: an item has no ``question`` or no ``mc1_targets`` / ``mc2_targets``.
        TypeError / ValueError: a targets field is not an ``{answer: 0 | 1}`` object (names
            the item index and the field).

    Reference: TruthfulQA (Lin et al., ACL 2022); lm-eval 0.4.13 ``tasks/truthfulqa``.
    """
    out = []
    for i, doc in enumerate(docs):
        for key in ("question", "mc1_targets", "mc2_targets"):
            if key not in doc:
                raise KeyError(f"item {i} has no {key!r}")
        converted = {
            key: _mc_targets(value, f"item {i} {key}")
            for key, value in doc.items()
            if key in ("mc0_targets", "mc1_targets", "mc2_targets")
        }
        out.append({**doc, **converted})
    return out


PROCESSORS: dict[str, Callable[[list[dict]], list[dict]]] = {
    "hellaswag": hellaswag,
    "truthfulqa_mc": truthfulqa_mc,
}
