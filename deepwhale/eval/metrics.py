"""Metrics and their standard errors, computed as lm-eval 0.4.x does (``lm_eval/api/metrics.py``).

* ``acc``: 1 when the choice with the highest summed log-likelihood is the gold one.
* ``acc_norm``: the same after dividing each choice's log-likelihood by the length of the
  choice text (``ConfigurableTask.process_results``: ``len(choice)``, characters of the choice
  without the target delimiter; equal to bytes for ASCII text).
* stderr of a mean: the sample standard deviation (``n - 1``) over ``sqrt(n)``
  (``mean_stderr``).
* ``word_perplexity = exp(-sum ll / words)``, ``byte_perplexity = exp(-sum ll / bytes)``,
  ``bits_per_byte = -sum ll / bytes / ln 2`` (``weighted_perplexity``, ``bits_per_byte``), where
  words are ``re.split(r"\\s+", text)`` pieces and bytes UTF-8 bytes; ``token_perplexity =
  exp(-sum ll / tokens)`` is ours (lm-eval does not report it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's ``argmax`` tie rule, as lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """``acc`` and ``acc_norm`` (0.0 or 1.0) for one document.

    Args:
        lls: summed log-likelihood of each choice, nats.
        choices: the choice texts (without the target delimiter).
        gold: index of the correct choice.

    Raises:
        ValueError: ``lls`` and ``choices`` differ in length, or ``gold`` is out of range.
    """
    if len(lls) != len(choices):
        raise ValueError(f"{len(lls)} log-likelihoods for {len(choices)} choices")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside the {len(choices)} choices")
    norm = [ll / float(len(c)) if len(c) else ll for ll, c in zip(lls, choices, strict=True)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(norm) == gold)}


@dataclass(frozen=True)
class ResultProcessor:
    """A multiple-choice task's per-document metrics (a task file's ``process_results``).

    ``fn(doc, lls, choices, gold)`` returns ``{metric: value}`` for one document, for every
    name in ``metrics`` (``lls``: summed log-likelihood per choice, nats); it raises
    ValueError on inconsistent input.
    """

    fn: Callable[[dict, Sequence[float], Sequence[str], int], dict[str, float]]
    metrics: tuple[str, ...]


def _default_mc(doc: dict, lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    return multiple_choice_metrics(lls, choices, gold)


DEFAULT_MC = ResultProcessor(_default_mc, ("acc", "acc_norm"))
RESULT_PROCESSORS: dict[str, ResultProcessor] = {}


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean. Raises ValueError on an empty sequence."""
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample stddev (``n - 1``) / ``sqrt(n)``; NaN for ``n < 2``."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    var = sum((x - mu) ** 2 for x in values) / (n - 1)
    return math.sqrt(var) / math.sqrt(n)


def count_words(text: str) -> int:
    """Words as lm-eval counts them: ``len(re.split(r"\\s+", text))``."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes of ``text``."""
    return len(text.encode("utf-8"))


def perplexity_metrics(lls: Sequence[float], tokens: int, words: int, nbytes: int) -> dict:
    """Corpus-level perplexities from per-document log-likelihoods.

    Args:
        lls: summed log-likelihood of each document, nats.
        tokens, words, nbytes: totals over the same documents.

    Returns:
        ``token_perplexity``, ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``.

    Raises:
        ValueError: a zero count.
    """
    if min(tokens, words, nbytes) <= 0:
        raise ValueError(f"empty corpus: {tokens} tokens, {words} words, {nbytes} bytes")
    total = math.fsum(lls)
    return {
        "token_perplexity": math.exp(-total / tokens),
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / nbytes),
        "bits_per_byte": -total / nbytes / math.log(2),
    }
