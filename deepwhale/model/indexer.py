"""The lightning indexer of DeepSeek Sparse Attention (DSA), DeepSeek-V3.2.

DeepSeek-V3.2 tech report (arXiv:2512.02556) §2.1: a small multi-head scorer runs beside MLA. For
a query token ``t`` and a preceding token ``s`` the index score is

    I[t, s] = sum_j  w[t, j] * ReLU(q_I[t, j] . k_I[s])            (eq. 1)

with ``H_I = index_n_heads`` query heads ``q_I`` (projected from MLA's compressed query), one key
``k_I`` per token shared by all heads, and per-head weights ``w`` projected from the hidden state.
The fine-grained token selection keeps the ``index_topk`` tokens with the largest scores, and MLA
attends only to them (eq. 2; §2.1.1 instantiates it on MLA's MQA mode, so every query head reads
the same selected latents). The indexer's keys are the only per-token state DSA adds to the cache.

The release computes the scores in FP8 after a Hadamard rotation of ``q_I`` and ``k_I``. The
rotation is orthogonal, so dot products are unchanged, and we score in fp32, as transformers'
``deepseek_v32`` port does. Attribute names mirror the HF checkpoint keys
(``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``), so loading is an identity map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import apply_rotary, linear_weight


class Indexer(nn.Module):
    """DeepSeek-V3.2's lightning indexer (DeepSeek-V3.2 §2.1, eq. 1): scores and top-k selection.

    Parameters: ``wq_b`` ``(H_I * D_I, q_lora_rank)`` (queries from MLA's normalised compressed
    query), ``wk`` ``(D_I, hidden_size)`` and ``k_norm`` (LayerNorm, weight and bias) for the key,
    ``weights_proj`` ``(H_I, hidden_size)`` for the per-head weights ``w``. The first
    ``qk_rope_head_dim`` dims of queries and keys carry RoPE, rotating the two halves (MLA itself
    rotates interleaved pairs).

    Use :meth:`keys` for the per-token keys to cache, then :meth:`select` for the chosen tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.scale = self.head_dim**-0.5
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(h, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(h, self.n_heads, bias=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE (two halves) on the first ``rope_dim`` dims of ``x`` ``(B, heads, T, D_I)``."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin, interleave=False), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Indexer keys ``k_I`` of the new tokens.

        Args:
            x: ``(B, T, hidden_size)`` the attention input; cos/sin: ``(B, T, rope_dim // 2)``.

        Returns ``(B, T, index_head_dim)``: normalised and rotated, ready to cache.
        """
        k = self.k_norm(self.wk(x)).unsqueeze(1)  # (B, 1, T, D_I)
        return self._rotate(k, cos, sin).squeeze(1)

    def scores(
        self,
        x: torch.Tensor,
        c_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index_k: torch.Tensor,
    ) -> torch.Tensor:
        """Index scores ``I[t, s]`` (eq. 1) of the new tokens against every key, in fp32.

        Args:
            x: ``(B, T, hidden_size)``; c_q: ``(B, T, q_lora_rank)`` MLA's normalised
                compressed query; cos/sin: ``(B, T, rope_dim // 2)``.
            index_k: ``(B, S, index_head_dim)`` keys of the tokens that can be selected.

        Returns ``(B, T, S)``, not yet masked.
        """
        b, t, _ = x.shape
        q = self.wq_b(c_q).view(b, t, self.n_heads, self.head_dim)  # (B, T, H_I, D_I)
        q = self._rotate(q.transpose(1, 2), cos, sin).transpose(1, 2)
        dots = torch.matmul(q.float(), index_k.float().transpose(1, 2).unsqueeze(1))  # (B,T,H_I,S)
        dots = F.relu(dots * self.scale)
        w = F.linear(x.float(), linear_weight(self.weights_proj).float())  # (B, T, H_I)
        w = w * self.n_heads**-0.5
        return torch.matmul(w.unsqueeze(-2), dots).squeeze(-2)  # (B, T, 1, S) -> (B, T, S)

    def select(
        self,
        x: torch.Tensor,
        c_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        index_k: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """The ``min(index_topk, S)`` highest-scoring keys each query may attend to.

        Args as :meth:`scores`, plus ``allowed`` ``(B, T, S)`` bool (causal and padding mask).

        Returns int64 key indices ``(B, T, K)``. Where a query has fewer than ``K`` allowed keys
        the remaining picks land on disallowed ones; callers keep ``allowed`` in their mask.

        Equal scores go to the earlier token. Ties are common in small models: a key that every
        head's ReLU zeroes scores exactly 0. ``torch.topk`` breaks them in an order that changes
        with ``S``, which would make a cached decode, a padded batch and a one-pass prefill
        choose different tokens; a stable sort does not depend on ``S``.
        """
        index = self.scores(x, c_q, cos, sin, index_k).masked_fill(~allowed, float("-inf"))
        k = min(self.topk, index.shape[-1])
        return index.sort(dim=-1, descending=True, stable=True).indices[..., :k]
