"""Log-likelihood of continuations on our model, tokenized and truncated as lm-eval's HF model
does (``lm_eval/api/model.py`` ``TemplateLM._encode_pair`` / ``loglikelihood`` and
``lm_eval/models/huggingface.py`` ``_loglikelihood_tokens``, 0.4.13).

Tokenization: trailing whitespace of the context moves to the front of the continuation; the
context and ``context + continuation`` are encoded with the tokenizer's defaults (BOS when its
config adds one) and the continuation is the tail of the whole encoding past the context's
length. An empty context becomes the prefix token (BOS, else EOS).

Batch-size invariance: rows are right-padded to a multiple of :data:`BUCKET` tokens and only
rows of the same padded length share a forward, so a row's padded shape, and with it every
kernel that touches it (GEMM tiles, attention blocks), does not depend on the batch size or on
the other rows. Causal attention keeps the padding from reaching real tokens; the head and the
log-softmax run per row. On the dense models measured (stories260K, debug-llama) scores are
bitwise equal for every batch size; MoE layers gather tokens from the whole batch per expert,
so there the last bits may depend on the batch (see tests/eval/test_scoring.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepwhale.tokenizer import Tokenizer

BUCKET = 64  # padded row length granularity, tokens


@dataclass(frozen=True)
class Score:
    """``logprob``: sum of the continuation's token log-probs (nats); ``is_greedy``: every
    continuation token is the argmax; ``tokens``: continuation length."""

    logprob: float
    is_greedy: bool
    tokens: int


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """lm-eval's ``prefix_token_id``: BOS, else EOS.

    Raises:
        ValueError: the tokenizer has neither.
    """
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has no BOS or EOS token to condition an empty context on")
    return tid


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` the way lm-eval 0.4.13's HF model builds them.

    Raises:
        ValueError: the continuation encodes to no tokens.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        ctx, cont = ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = tokenizer.encode(context + continuation)
        ctx = tokenizer.encode(context)
        cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after the context")
    return ctx, cont


def _row(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    """Model input: ``(ctx + cont)[-(max_len + 1):][:-1]`` (lm-eval's left truncation)."""
    return (ctx + cont)[-(max_len + 1) :][:-1]


def score_requests(
    module: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    max_len: int,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    on_batch: Callable[[list[int], list[Score]], None] | None = None,
) -> list[Score]:
    """Score ``(context_ids, continuation_ids)`` pairs.

    Args:
        module: a :class:`~deepwhale.model.transformer.CausalLM` (``model`` + ``lm_head``).
        requests: token id pairs; the context must be non-empty.
        max_len: model input length limit, tokens; longer inputs lose tokens on the left.
        batch_size: rows per forward (at most; rows are grouped by padded length).
        progress: called with the number of requests finished after each forward.
        on_batch: called after each forward with the request indices and their scores
            (the resume cache stores them).

    Returns:
        One :class:`Score` per request, in request order.

    Raises:
        ValueError: ``batch_size < 1``, an empty context or continuation, or a continuation
            longer than ``max_len``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation")
        if len(cont) > max_len:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens > max_len {max_len}")
    device = next(module.parameters()).device
    inputs = [_row(ctx, cont, max_len) for ctx, cont in requests]
    padded = [min(max_len, BUCKET * math.ceil(len(x) / BUCKET)) for x in inputs]
    # longest first (lm-eval's order: memory problems show up at once), grouped by padded length
    order = sorted(range(len(requests)), key=lambda i: (-padded[i], i))
    out: list[Score | None] = [None] * len(requests)
    module.eval()
    start = 0
    while start < len(order):
        width = padded[order[start]]
        batch = [order[start]]
        while (
            len(batch) < batch_size
            and start + len(batch) < len(order)
            and padded[order[start + len(batch)]] == width
        ):
            batch.append(order[start + len(batch)])
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T) right-padded with id 0
        for r, i in enumerate(batch):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i])
        ids = ids.to(device)
        positions = torch.arange(width, device=device).expand_as(ids)  # (B, T)
        with torch.inference_mode():
            hidden = module.model(ids, positions)  # (B, T, H)
            for r, i in enumerate(batch):
                cont = requests[i][1]
                end = len(inputs[i])
                logits = module.lm_head(hidden[r, end - len(cont) : end]).float()  # (C, V)
                logp = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(cont, device=device)
                picked = logp.gather(1, target[:, None])[:, 0]  # (C,)
                greedy = bool((logp.argmax(dim=-1) == target).all())
                out[i] = Score(float(picked.double().sum()), greedy, len(cont))
        start += len(batch)
        if on_batch is not None:
            on_batch(batch, [out[i] for i in batch])  # type: ignore[misc]
        if progress is not None:
            progress(len(batch))
    return out  # type: ignore[return-value]
