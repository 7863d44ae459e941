"""The language-modelling loss, written once for the single-process trainer, the parallel
trainer (DP/FSDP/TP loss-parallel) and the pipeline schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepwhale.train.data import IGNORE_INDEX


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in nats, computed in fp32.

    Args:
        logits: ``(B, T, V)`` in any float dtype (vocabulary-sharded DTensor logits work too:
            ``F.cross_entropy`` on them is TP's loss parallel).
        labels: ``(B, T)`` int64 target ids, :data:`~deepwhale.train.data.IGNORE_INDEX` (-100)
            where a position is not scored (padding, masked prompt tokens).

    Returns:
        A 0-d fp32 tensor: the sum over scored positions (divide by their count for the mean).
    """
    return F.cross_entropy(
        logits.float().flatten(0, 1),  # (B*T, V)
        labels.flatten(),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
