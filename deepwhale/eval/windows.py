"""Rolling windows for document log-likelihood (perplexity): every token scored exactly once.

The scheme is lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``
(``lm_eval/utils.py``, 0.4.x), with its ``context_len`` exposed as ``stride``:

* the first window feeds ``[prefix] + tokens[:n-1]`` and scores ``tokens[:n]``,
  ``n = min(max_len, len(tokens))``: token ``i`` sees the prefix and the ``i`` tokens before it;
* every later window scores the next ``min(remaining, max_len - stride + 1)`` tokens and feeds
  the ``max_len`` tokens that end just before its last target, so each of its targets sees at
  least ``stride`` earlier tokens of the document.

``stride = 1`` gives lm-eval's default disjoint windows (``context_len=1``); ``stride = max_len``
scores every token after the first window with a full ``max_len`` of context, one token per
window. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One scoring window.

    Attributes:
        context: tokens fed before the scored ones and not scored themselves (the prefix token
            for the first window).
        targets: the tokens scored in this window; ``context + targets[:-1]`` is the model
            input, at most ``max_len`` tokens.
        start: index of ``targets[0]`` in the document's token list.
    """

    context: list[int]
    targets: list[int]
    start: int


def rolling_windows(
    tokens: list[int], prefix_token: int, max_len: int, stride: int
) -> list[Window]:
    """Split a document's ``tokens`` into windows that score each token exactly once.

    Args:
        tokens: the document's token ids (no BOS), length ``N``.
        prefix_token: the token fed before the first one (lm-eval: BOS, else EOS).
        max_len: model input length per window, tokens (the model's context).
        stride: minimum tokens of document context for every target after the first window,
            in ``[1, max_len]``.

    Returns:
        Windows in document order; their ``targets`` concatenate to ``tokens``. Empty for an
        empty document.

    Raises:
        ValueError: ``max_len < 1`` or ``stride`` outside ``[1, max_len]``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    if not tokens:
        return []
    n = len(tokens)
    first = min(max_len, n)
    windows = [Window([prefix_token], list(tokens[:first]), 0)]
    pred_len = max_len - stride + 1
    done = first
    while done < n:
        k = min(n - done, pred_len)
        end = done + k
        # lm-eval feeds tokens[end - max_len - 1 : end - 1]; the overlap before the targets is
        # context, not scored again (make_disjoint_window).
        feed = tokens[max(0, end - max_len - 1) : end - 1]
        windows.append(Window(list(feed[: len(feed) - (k - 1)]), list(tokens[done:end]), done))
        done = end
    return windows
