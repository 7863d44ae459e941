"""Sentence embeddings from a causal LM: pooled final hidden states.

:func:`embed` runs :meth:`~deepwhale.model.transformer.CausalLM.hidden_states` (the decoder's
output after the final norm, what ``lm_head`` reads) over token-id lists, batched by padding on
the right (causal attention: a token never sees the padding after it, so a batched input pools
the same as alone), and pools each input's own positions:

* ``"mean"``: the mean over all its tokens (BOS included when the tokenizer adds one), the default;
* ``"last"``: its last token's state (the one that predicts the next token), vLLM's ``LAST``.

Vectors are L2-normalised float32, as OpenAI's and vLLM's embeddings endpoints return them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("mean", "last")
#: padded tokens per forward pass at most (one input longer than this runs alone)
MAX_BATCH_TOKENS = 8192


def embed(
    module: nn.Module,
    inputs: Sequence[Sequence[int]],
    pooling: str = "mean",
    normalize: bool = True,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> torch.Tensor:
    """Pooled final hidden states of token-id lists.

    Args:
        module: a :class:`~deepwhale.model.transformer.CausalLM` (anything with
            ``hidden_states(input_ids (B, T), positions (B, T)) -> (B, T, H)``), in eval mode.
        inputs: N non-empty token-id lists (the caller checks them against the context).
        pooling: ``"mean"`` or ``"last"`` (see the module docstring).
        normalize: divide each vector by its L2 norm.
        max_batch_tokens: padded tokens per forward pass at most; inputs are grouped longest
            first.

    Returns:
        ``(N, H)`` float32 on the CPU, row ``i`` for ``inputs[i]``.

    Raises:
        ValueError: an unknown ``pooling``, an empty input, or token ids outside the vocabulary.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    if any(len(ids) == 0 for ids in inputs):
        raise ValueError("every input needs at least one token")
    device = next(module.parameters()).device
    out: list[torch.Tensor | None] = [None] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(inputs[order[start]])  # the longest of this group
            size = max(1, min(len(order) - start, max_batch_tokens // width))
            group = order[start : start + size]
            start += size
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.bool)
            for row, i in enumerate(group):
                ids[row, : len(inputs[i])] = torch.as_tensor(inputs[i], dtype=torch.long)
                mask[row, : len(inputs[i])] = True
            ids, mask = ids.to(device), mask.to(device)
            positions = torch.arange(width, device=device).expand(len(group), width)
            h = module.hidden_states(ids, positions).float()  # (b, T, H)
            if pooling == "mean":
                m = mask.unsqueeze(-1)
                pooled = h.masked_fill(~m, 0.0).sum(1) / m.sum(1)
            else:
                pooled = h[torch.arange(len(group), device=device), mask.sum(1) - 1]
            if normalize:
                pooled = F.normalize(pooled, dim=-1)
            for row, i in enumerate(group):
                out[i] = pooled[row].cpu()
    return torch.stack(out) if out else torch.empty(0, 0)
