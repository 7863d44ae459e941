"""Attention: grouped-query attention (LLaMA/Qwen2) and multi-head latent attention (DeepSeek).

Both take the layer's cache as an argument; the cache is allocated outside the module (see
:mod:`deepwhale.model.cache`). Positions are explicit per sequence, so sequences of different
lengths can share a batch.

References: GQA (Ainslie et al., arXiv:2305.13245); MLA (DeepSeek-V2, arXiv:2405.04434, §2.1):
queries and keys/values are projected through low-rank latents; only the latent ``c_kv``
(``kv_lora_rank`` wide) and the shared RoPE key (``qk_rope_head_dim`` wide) are cached per token.
DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv:2512.02556, §2.1): MLA attends only to the
``index_topk`` tokens its lightning indexer (:mod:`deepwhale.model.indexer`) selects per query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwhale.model.cache import IndexedMLACache, KVCache, MLACache
from deepwhale.model.config import ModelConfig
from deepwhale.model.indexer import Indexer
from deepwhale.model.layers import RMSNorm, apply_rotary, linear_weight, softmax_scale


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal mask from explicit positions.

    Args:
        q_pos: ``(B, T)`` query positions, tokens.
        k_pos: ``(B, S)`` or ``(S,)`` key positions.

    Returns a bool mask ``(B, 1, T, S)``, True where the query may attend to the key.
    """
    if k_pos.dim() == 1:
        k_pos = k_pos.expand(q_pos.shape[0], -1)
    return (k_pos[:, None, :] <= q_pos[:, :, None]).unsqueeze(1)


#: key-block size of :func:`blocked_attention`; query blocks attend in blocks beyond 2x this
ATTN_BLOCK = 4096


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    block: int = ATTN_BLOCK,
) -> torch.Tensor:
    """Causal attention over key blocks with an online softmax (the FlashAttention recurrence,
    Dao et al., arXiv:2205.14135), so memory is ``O(T * block)`` instead of ``O(T * S)``.

    Args:
        q: ``(B, H, T, D)`` queries; ``H`` a multiple of the key heads (GQA: query head ``h``
            reads key head ``h // (H / Hk)``, as ``scaled_dot_product_attention(enable_gqa)``).
        k: ``(B, Hk, S, D)`` keys; v: ``(B, Hk, S, Dv)`` values.
        q_pos: ``(B, T)`` query positions; k_pos: ``(S,)`` or ``(B, S)`` key positions (a
            query attends to keys at positions ``<=`` its own).
        scale: logit scale.
        block: keys per block.

    Returns ``(B, H, T, Dv)`` in ``q``'s dtype (accumulated in fp32).
    """
    b, h, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    g = h // hk
    qf = q.float().reshape(b, hk, g * t, d)  # (B, Hk, G*T, D): head-major like enable_gqa
    qp = q_pos[:, None, :].expand(b, g, t).reshape(b, 1, g * t, 1)
    if k_pos.dim() == 1:
        k_pos = k_pos.expand(b, -1)
    m = torch.full((b, hk, g * t, 1), float("-inf"), device=q.device)
    denom = torch.zeros(b, hk, g * t, 1, device=q.device)
    acc = torch.zeros(b, hk, g * t, v.shape[-1], device=q.device)
    for s0 in range(0, s, block):
        kb, vb = k[:, :, s0 : s0 + block].float(), v[:, :, s0 : s0 + block].float()
        scores = torch.matmul(qf, kb.transpose(-1, -2)) * scale  # (B, Hk, G*T, Kb)
        allowed = k_pos[:, None, None, s0 : s0 + block] <= qp
        scores = scores.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - m_safe)
        corr = torch.exp(m - m_safe)
        denom = denom * corr + p.sum(dim=-1, keepdim=True)
        acc = acc * corr + torch.matmul(p, vb)
        m = m_new
    return (acc / denom).view(b, h, t, -1).to(q.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (LLaMA, Qwen2, DeepSeek LLM/Coder).

    Attribute names mirror HF checkpoint keys: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    ``forward(x, cos, sin, positions, cache=None)``:
        x: ``(B, T, hidden_size)``; cos/sin: ``(B, T, head_dim // 2)``; positions: ``(B, T)``.
        cache: a :class:`KVCache` (keys/values are written at ``positions``) or None.
        Returns ``(B, T, hidden_size)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, self.interleave)
        k = apply_rotary(k, cos, sin, self.interleave)
        if cache is not None:
            k, v, k_pos = cache.update(positions, k, v)  # (B, Hkv, S, D), (S,)
        else:
            k_pos = positions
        if t > 1 and k.shape[2] > 2 * ATTN_BLOCK:  # long prefill: bounded memory
            out = blocked_attention(q, k, v, positions, k_pos, self.scale, ATTN_BLOCK)
        else:
            mask = attention_mask(positions, k_pos)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, H * D)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1), the "naive" form.

    Attribute names mirror HF checkpoint keys: ``q_proj`` (or ``q_a_proj``, ``q_a_layernorm``,
    ``q_b_proj`` when ``q_lora_rank`` is set), ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
    ``kv_b_proj``, ``o_proj``.

    The cache (:class:`MLACache`) holds only the normalised latent ``c_kv`` ``(B, S, kv_lora_rank)``
    and the rotated shared key ``k_pe`` ``(B, S, qk_rope_head_dim)``; keys and values are
    re-expanded from it through ``kv_b_proj``.

    ``forward(x, cos, sin, positions, cache=None)``: x ``(B, T, hidden_size)``, cos/sin
    ``(B, T, qk_rope_head_dim // 2)``, positions ``(B, T)``; returns ``(B, T, hidden_size)``.

    ``attn_impl`` chooses how attention reads the cache: ``"naive"`` re-expands per-head keys
    and values from the latent; ``"absorb"`` folds ``W_UK`` into the query and ``W_UV`` into the
    output (DeepSeek-V2 §2.1.3 / appendix), so attention runs as multi-query attention directly
    over the latent and nothing per-head is materialised for the cached tokens; ``"auto"`` (the
    default) absorbs for short query blocks (decode) and expands for long ones (prefill), as
    DeepSeek's reference inference code recommends for each phase.

    DeepSeek-V3.2 (``config.is_sparse_attention``) adds ``indexer`` (:class:`Indexer`) and an
    :class:`IndexedMLACache` that also holds the indexer's keys. Each query attends to the
    ``index_topk`` allowed tokens with the highest index scores (DeepSeek-V3.2 §2.1, eq. 2): the
    naive form masks the other keys out; the absorbed form gathers only the selected latents
    ``(B, T, index_topk, kv_lora_rank + rope)``, so a decode step's attention reads
    ``index_topk`` tokens however long the context is.
    """

    #: query blocks up to this many tokens use the absorbed form under ``attn_impl="auto"``
    ABSORB_MAX_TOKENS = 16

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            h, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=config.attention_bias)
        self.indexer = Indexer(config) if config.is_sparse_attention else None
        self.attn_impl = "auto"

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache: MLACache | IndexedMLACache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            c_q = None
            q = self.q_proj(x)
        else:
            c_q = self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank)
            q = self.q_b_proj(c_q)
        q = q.view(b, t, -1, self.qk_dim).transpose(1, 2)  # (B, H, T, nope+rope); -1: TP shard
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + rope)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, kv_lora_rank)
        q_pe = apply_rotary(q_pe, cos, sin, self.interleave)
        k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin, self.interleave).squeeze(1)  # (B, T, rope)
        if cache is not None:
            c_kv, k_pe, k_pos = cache.update(positions, c_kv, k_pe)  # (B, S, r), (B, S, rope)
        else:
            k_pos = positions
        if self.indexer is not None:
            out = self._sparse(x, c_q, cos, sin, positions, k_pos, q_nope, q_pe, c_kv, k_pe, cache)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, H * v_head_dim)
        long = c_kv.shape[1] > 2 * ATTN_BLOCK
        absorb = self.attn_impl == "absorb" or (
            self.attn_impl == "auto" and cache is not None and (t <= self.ABSORB_MAX_TOKENS or long)
        )
        if absorb and long:  # long prefill: latent attention over key blocks, bounded memory
            out = self._absorbed_blocked(q_nope, q_pe, c_kv, k_pe, positions, k_pos)
        elif absorb:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, attention_mask(positions, k_pos))
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, attention_mask(positions, k_pos))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, H * v_head_dim)

    def _sparse(
        self, x, c_q, cos, sin, positions, k_pos, q_nope, q_pe, c_kv, k_pe, cache
    ) -> torch.Tensor:
        """DeepSeek Sparse Attention (DeepSeek-V3.2 §2.1): the indexer picks up to
        ``index_topk`` allowed keys per query, and MLA attends to those only.

        ``c_kv`` ``(B, S, r)`` and ``k_pe`` ``(B, S, rope)`` are the latents of every key (cached
        and new), at positions ``k_pos``. Returns ``(B, H, T, v_head_dim)``.
        """
        index_k = self.indexer.keys(x, cos, sin)  # (B, T, index_head_dim)
        if cache is not None:
            index_k = cache.update_index(positions, index_k)  # (B, S, index_head_dim)
        allowed = attention_mask(positions, k_pos)  # (B, 1, T, S)
        chosen = self.indexer.select(x, c_q, cos, sin, index_k, allowed[:, 0])  # (B, T, K)
        absorb = self.attn_impl == "absorb" or (
            self.attn_impl == "auto" and cache is not None and x.shape[1] <= self.ABSORB_MAX_TOKENS
        )
        if absorb:
            return self._absorbed_sparse(q_nope, q_pe, c_kv, k_pe, chosen, allowed[:, 0])
        picked = torch.zeros_like(allowed).scatter_(-1, chosen.unsqueeze(1), True)
        return self._naive(q_nope, q_pe, c_kv, k_pe, allowed & picked)

    def _absorbed_sparse(self, q_nope, q_pe, c_kv, k_pe, chosen, allowed) -> torch.Tensor:
        """The absorbed form over the selected latents only.

        Args: q_nope ``(B, H, T, nope)``, q_pe ``(B, H, T, rope)``, c_kv ``(B, S, r)``, k_pe
        ``(B, S, rope)``, chosen ``(B, T, K)`` key indices, allowed ``(B, T, S)`` bool.
        Returns ``(B, H, T, v_head_dim)``.
        """
        b, h, t, _ = q_nope.shape
        k = chosen.shape[-1]
        w_uk, w_uv = self._absorbed_weights()  # (H, nope, r), (H, v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, r)
        flat = chosen.reshape(b, t * k, 1)  # (B, T*K, 1)
        c_sel = c_kv.gather(1, flat.expand(-1, -1, c_kv.shape[-1])).view(b, t, k, -1)  # (B,T,K,r)
        pe_sel = k_pe.gather(1, flat.expand(-1, -1, k_pe.shape[-1])).view(b, t, k, -1)
        scores = torch.einsum("bhtr,btkr->bhtk", q_lat, c_sel)
        scores = (scores + torch.einsum("bhtp,btkp->bhtk", q_pe, pe_sel)) * self.scale
        valid = allowed.gather(-1, chosen).unsqueeze(1)  # (B, 1, T, K)
        probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1, dtype=torch.float32)
        o_lat = torch.einsum("bhtk,btkr->bhtr", probs.to(c_sel.dtype), c_sel)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv.to(o_lat.dtype))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Expand per-head keys/values from the latent; returns ``(B, H, T, v_head_dim)``."""
        b, s = c_kv.shape[:2]
        h = q_nope.shape[1]  # all heads, or this rank's share under tensor parallelism
        kv = self.kv_b_proj(c_kv).view(b, s, h, self.nope_dim + self.v_dim)  # (B, S, H, nope+v)
        k_nope, v = kv.transpose(1, 2).split([self.nope_dim, self.v_dim], dim=-1)  # (B, H, S, *)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, h, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK`` ``(H, nope, r)`` and ``W_UV`` ``(H, v, r)`` from ``kv_b_proj``."""
        w = linear_weight(self.kv_b_proj).view(
            self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank
        )
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _absorbed_blocked(self, q_nope, q_pe, c_kv, k_pe, q_pos, k_pos) -> torch.Tensor:
        """The absorbed form through :func:`blocked_attention`: the latent is one key/value
        head shared by all query heads. Returns ``(B, H, T, v_head_dim)``."""
        b, h, t, _ = q_nope.shape
        w_uk, w_uv = self._absorbed_weights()
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, r)
        q_all = torch.cat((q_lat, q_pe), dim=-1)  # (B, H, T, r + rope)
        k_all = torch.cat((c_kv, k_pe), dim=-1)[:, None]  # (B, 1, S, r + rope)
        o_lat = blocked_attention(q_all, k_all, c_kv[:, None], q_pos, k_pos, self.scale, ATTN_BLOCK)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv.to(o_lat.dtype))

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Attention over the latent with W_UK / W_UV absorbed; returns ``(B, H, T, v_head_dim)``.

        score = (q_nope W_UK) . c_kv + q_pe . k_pe, out = (softmax(score) c_kv) W_UV^T.
        """
        b, h, t, _ = q_nope.shape
        w_uk, w_uv = self._absorbed_weights()  # (H, nope, r), (H, v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, r)
        q_all = torch.cat((q_lat, q_pe), dim=-1).reshape(b, h * t, -1)  # (B, H*T, r + rope)
        k_all = torch.cat((c_kv, k_pe), dim=-1)  # (B, S, r + rope), shared by all heads
        scores = torch.bmm(q_all, k_all.transpose(1, 2)) * self.scale  # (B, H*T, S)
        keep = mask.expand(b, h, t, -1).reshape(b, h * t, -1)
        probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1, dtype=torch.float32)
        o_lat = torch.bmm(probs.to(c_kv.dtype), c_kv).view(b, h, t, -1)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv.to(o_lat.dtype))
