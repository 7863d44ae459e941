"""Metrics and their standard errors, computed as lm-eval 0.4.x does (``lm_eval/api/metrics.py``).

* ``acc``: 1 when the choice with the highest summed log-likelihood is the gold one.
* ``acc_norm``: the same after dividing each choice's log-likelihood by the length of the
  choice text (``ConfigurableTask.process_results``: ``len(choice)``, characters of the choice
  without the target delimiter; equal to bytes for ASCII text).
* TruthfulQA MC2 ``acc`` (``tasks/truthfulqa/utils.py`` ``process_results_mc2``): the
  probability mass of the true answers, ``sum(exp(ll) for true) / sum(exp(ll) for all)``.
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


def truthfulqa_mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2 score of one question: the normalised probability of the true answers.

    ``p_i = exp(ll_i) / sum_j exp(ll_j)`` over all the answers, summed over those labelled 1,
    as lm-eval 0.4.13's ``process_results_mc2`` does: it selects ``labels == 1``. Older
    lm-eval releases split the answers at the first 0 label instead; the two agree when the
    true answers come first, as in all but two items (indices 335 and 342) of the shared 2025
    ``mc_task.json``. Computed as a softmax shifted by the largest log-likelihood: equal to
    lm-eval's ``np.exp`` form to rounding, and finite where every ``exp(ll)`` underflows (all
    ``ll < -745``), where lm-eval's gives NaN.

    Args:
        lls: summed log-likelihood of each answer, nats.
        labels: 1 for a true answer, 0 for a false one, in the same order.

    Returns:
        A probability in [0, 1] (0 when no answer is true).

    Raises:
        ValueError: ``lls`` and ``labels`` differ in length or are empty, a label is not 0/1,
            or a log-likelihood is NaN or ``+inf``.

    Reference: TruthfulQA (Lin et al., ACL 2022), MC2; lm-eval 0.4.13.
    """
    if len(lls) != len(labels) or not lls:
        raise ValueError(f"{len(lls)} log-likelihoods for {len(labels)} labels")
    if any(label not in (0, 1) for label in labels):
        raise ValueError(f"labels must be 0 or 1, got {list(labels)}")
    if any(math.isnan(ll) or ll == math.inf for ll in lls):
        raise ValueError(f"log-likelihoods must be finite or -inf, got {list(lls)}")
    top = max(lls)
    if top == -math.inf:
        raise ValueError("every answer has log-likelihood -inf")
    weights = [math.exp(ll - top) for ll in lls]
    true = math.fsum(w for w, label in zip(weights, labels, strict=True) if label == 1)
    return true / math.fsum(weights)


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


def _truthfulqa_mc2(doc: dict, lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    try:
        labels = doc["mc2_targets"]["labels"]
    except (KeyError, TypeError):
        raise ValueError("no mc2_targets.labels (use process_docs: truthfulqa_mc)") from None
    return {"acc": truthfulqa_mc2(lls, labels)}


DEFAULT_MC = ResultProcessor(_default_mc, ("acc", "acc_norm"))
RESULT_PROCESSORS: dict[str, ResultProcessor] = {
    "truthfulqa_mc2": ResultProcessor(_truthfulqa_mc2, ("acc",)),
}


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
