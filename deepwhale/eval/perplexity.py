"""Perplexity of token sequences, the quick quality check of a model transform (INT8) and of the
data pipeline's perplexity filter. Full documents with strided windows and word/byte
perplexities are :mod:`deepwhale.eval.windows` (``ppl:FILE`` tasks)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from deepwhale.model.cache import make_cache
from deepwhale.model.transformer import CausalLM


@torch.inference_mode()
def perplexity(module: CausalLM, sequences: Iterable[list[int]], stepwise: bool = False) -> float:
    """Perplexity ``exp(mean NLL)`` of next-token prediction over token sequences.

    Each sequence is scored on its own from its first token, in windows of at most
    ``max_position_embeddings`` tokens; the first token of each window is context only.

    Args:
        module: the model (quantized or not).
        sequences: token id lists (e.g. one per document, BOS included).
        stepwise: score through the decode path, one token per forward with a KV cache (this
            exercises the one-row kernels, e.g. fbgemm), instead of one forward per window.

    Returns:
        Perplexity (a float >= 1; lower is better).

    Raises:
        ValueError: no sequence has two or more tokens.
    """
    ctx = module.config.max_position_embeddings
    param = next(module.parameters())  # the cache's device and dtype, as in generation
    nll, count = 0.0, 0
    for seq in sequences:
        for start in range(0, max(len(seq) - 1, 0), ctx):
            ids = torch.tensor([seq[start : start + ctx]], device=param.device)  # (1, T)
            if ids.shape[1] < 2:
                continue
            if stepwise:
                caches = make_cache(
                    module.config, 1, ids.shape[1], dtype=param.dtype, device=param.device
                )
                logits = torch.cat(
                    [
                        module(
                            ids[:, i : i + 1], torch.full((1, 1), i, device=param.device), caches
                        )
                        for i in range(ids.shape[1] - 1)
                    ],
                    dim=1,
                )  # (1, T-1, V)
            else:
                logits = module(ids)[:, :-1]  # (1, T-1, V)
            nll += F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    if count == 0:
        raise ValueError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(nll / count)


def read_documents(path: str | Path, separator: str = "<|endoftext|>") -> list[str]:
    """The non-empty documents of a text file split on ``separator`` (TinyStories' layout)."""
    text = Path(path).read_text(encoding="utf-8")
    return [d.strip() for d in text.split(separator) if d.strip()]
