"""Named ``process_docs`` steps a task file may ask for (``process_docs: NAME``).

Each is a verbatim re-statement of the lm-eval 0.4.x task's own function, so scores match.
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


PROCESSORS: dict[str, Callable[[list[dict]], list[dict]]] = {"hellaswag": hellaswag}
