"""Pieces of lm-eval 0.4.13's ``generate_until`` scoring: stop sequences, filters, exact_match.

Facts from lm-eval 0.4.13 (``tasks/gsm8k/gsm8k.yaml``, ``filters/extraction.py``,
``filters/selection.py``, ``api/metrics.py``), implemented here on our own:

- a generation is cut at the first occurrence of any ``until`` string (decoded text);
- ``regex`` filter: ``re.findall(regex_pattern, text)``; no match gives the fallback
  ``"[invalid]"``; otherwise the ``group_select``-th match (negative counts from the end); a
  pattern with several groups yields a tuple, of which the first non-empty group is taken
  (the fallback if all are empty); the result is ``strip()``-ed;
- ``take_first``: keep the first response of a document's list;
- ``exact_match``: every ``regexes_to_ignore`` pattern is removed (``re.sub``, in order) from
  prediction and reference, then ``ignore_case`` lowercases, ``ignore_punctuation`` deletes
  ``string.punctuation``, ``ignore_numbers`` deletes digits; 1.0 when equal, else 0.0.

A ``filter_list`` entry is ``{name, filter: [{function, ...kwargs}]}``; :func:`build_filters`
checks it and raises :class:`~deepwhale.eval.tasks.TaskError` naming the file and key.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from deepwhale.eval.tasks import TaskError

FALLBACK = "[invalid]"

Filter = Callable[[list[str]], list[str]]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string in ``until``."""
    end = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if 0 <= i < end:
                end = i
    return text[:end]


def regex_filter(pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> Filter:
    """lm-eval 0.4.13's ``regex`` filter over one document's responses (see module docstring).

    Raises ``re.error`` for a pattern that does not compile (:func:`build_filters` reports it).
    """
    rx = re.compile(pattern)

    def apply(responses: list[str]) -> list[str]:
        out = []
        for resp in responses:
            found = rx.findall(resp if isinstance(resp, str) else "")
            if not found:
                out.append(fallback)
                continue
            try:
                hit = found[group_select]
            except IndexError:
                raise TaskError(
                    f"regex filter: group_select {group_select} out of range for {len(found)} matches"
                ) from None
            if isinstance(hit, tuple):
                hit = next((g for g in hit if g), fallback)
            out.append(hit.strip())
        return out

    return apply


def take_first(responses: list[str]) -> list[str]:
    """lm-eval 0.4.13's ``take_first``: the first response only (a one-element list)."""
    return responses[:1]


def build_filters(filter_list: object, where: str) -> list[tuple[str, list[Filter]]]:
    """Parse a task's ``filter_list`` into ``[(name, [filter, ...])]``.

    ``where`` names the task file for errors. Raises TaskError for a non-list, an entry
    without ``name``/``filter``, an unknown ``function`` (known: regex, take_first), an
    unknown keyword or a regex that does not compile.
    """
    if filter_list is None:
        return [("none", [take_first])]
    if not isinstance(filter_list, list):
        raise TaskError(f"{where}: filter_list must be a list of {{name, filter}}")
    chains = []
    for i, entry in enumerate(filter_list):
        key = f"{where}: filter_list[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "filter" not in entry:
            raise TaskError(f"{key} needs 'name' and 'filter'")
        steps = []
        for j, step in enumerate(entry["filter"] or []):
            skey = f"{key}.filter[{j}]"
            if not isinstance(step, dict) or "function" not in step:
                raise TaskError(f"{skey} needs 'function'")
            kwargs = {k: v for k, v in step.items() if k != "function"}
            fn = step["function"]
            if fn == "take_first":
                if kwargs:
                    raise TaskError(f"{skey}: take_first takes no keys, got {sorted(kwargs)}")
                steps.append(take_first)
            elif fn == "regex":
                bad = set(kwargs) - {"regex_pattern", "group_select", "fallback"}
                if bad:
                    raise TaskError(f"{skey}: unknown regex filter key(s) {sorted(bad)}")
                pattern = kwargs.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")
                try:
                    steps.append(
                        regex_filter(
                            pattern,
                            int(kwargs.get("group_select", 0)),
                            str(kwargs.get("fallback", FALLBACK)),
                        )
                    )
                except re.error as e:
                    raise TaskError(
                        f"{skey}.regex_pattern {pattern!r} does not compile: {e}"
                    ) from None
            else:
                raise TaskError(
                    f"{skey}: unknown filter function {fn!r} (known: regex, take_first)"
                )
        chains.append((str(entry["name"]), steps))
    return chains


def apply_chain(steps: list[Filter], responses: list[str]) -> str:
    """Run one filter chain over a document's responses; the first surviving value (or "")."""
    for step in steps:
        responses = step(responses)
    return responses[0] if responses else ""


def exact_match(
    prediction: str,
    reference: str,
    *,
    regexes_to_ignore: Sequence[str] | None = None,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> float:
    """1.0 if ``prediction`` equals ``reference`` after lm-eval 0.4.13's normalisation, else 0.0.

    Follows ``lm_eval.api.metrics.exact_match_hf_evaluate`` (order: regexes, case,
    punctuation, digits). Raises ``re.error`` for a bad pattern.
    """
    p, r = prediction, reference
    for rx in regexes_to_ignore or ():
        p, r = re.sub(rx, "", p), re.sub(rx, "", r)
    if ignore_case:
        p, r = p.lower(), r.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        p, r = p.translate(table), r.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        p, r = p.translate(table), r.translate(table)
    return float(p == r)
