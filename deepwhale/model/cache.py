"""Static per-layer caches, allocated once for ``(max_batch_size, max_seq_len)`` and written in place.

* :class:`KVCache` holds keys and values ``(B, S, n_kv_heads, head_dim)`` for GQA layers.
* :class:`MLACache` holds MLA's compressed latent ``(B, S, kv_lora_rank)`` and the shared RoPE key
  ``(B, S, qk_rope_head_dim)`` (DeepSeek-V2 §2.1.2, "low-rank key-value joint compression").
* :class:`IndexedMLACache` adds DeepSeek-V3.2's lightning-indexer key ``(B, S, index_head_dim)``
  (DeepSeek-V3.2 §2.1): one small key per token, shared by the indexer's heads. Nothing else is
  cached; the top-k selection is recomputed from it at every step.

Each sequence ``b`` writes at its own positions, so sequences of different lengths share a batch:
a query at position ``p`` attends to cache slots ``0..p`` of its own row, and slots past ``p`` left
over from an earlier, longer sequence are masked out.
"""

from __future__ import annotations

import copy

import torch

from deepwhale.model.config import ModelConfig


class _StaticCache:
    """Two aligned buffers indexed ``[batch, position]``; subclasses name them."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b
        self.max_seq_len = a.shape[1]
        self.positions = torch.arange(self.max_seq_len, device=a.device)
        #: attend over all ``max_seq_len`` slots (static shapes for torch.compile) instead of
        #: truncating to the longest written position (less work in eager mode)
        self.static_len = False

    def _write(
        self, positions: torch.Tensor, a_new: torch.Tensor, b_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write ``a_new``/``b_new`` ``(B, T, ...)`` at ``positions`` ``(B, T)`` into rows
        ``0 .. B``; return views of those rows up to the longest written
        length (or all ``max_seq_len`` with ``static_len``), and their positions ``(S,)``.

        Raises:
            ValueError: a position at or past ``max_seq_len``, or rows past the allocated batch.
        """
        kv_len = self._store(self.a, positions, a_new)
        self._store(self.b, positions, b_new)
        bsz = positions.shape[0]
        return self.a[:bsz, :kv_len], self.b[:bsz, :kv_len], self.positions[:kv_len]

    def _store(self, buf: torch.Tensor, positions: torch.Tensor, new: torch.Tensor) -> int:
        """Write ``new`` ``(B, T, ...)`` into ``buf`` at ``positions`` ``(B, T)``, rows ``0 .. B``;
        return the length to read back (the longest written position + 1, or ``max_seq_len``
        with ``static_len``). Errors as :meth:`_write`."""
        bsz = positions.shape[0]
        if bsz > buf.shape[0]:
            raise ValueError(f"rows 0..{bsz - 1} exceed the cache's {buf.shape[0]} rows")
        if self.static_len:
            kv_len = self.max_seq_len
        else:
            kv_len = int(positions.max()) + 1
            if kv_len > self.max_seq_len:
                raise ValueError(
                    f"position {kv_len - 1} is past the cache's max_seq_len {self.max_seq_len}"
                )
        rows = torch.arange(bsz, device=positions.device)[:, None]  # (B, 1)
        buf[rows, positions] = new.to(buf.dtype)
        return kv_len

    def rows(self, lo: int, hi: int) -> _StaticCache:
        """A cache of the same kind over rows ``lo .. hi`` of this one (views, no copy): a
        forward through it reads and writes those rows, with batch row 0 at row ``lo`` (the
        engine prefills one slot this way).

        Raises:
            ValueError: an empty or out-of-range row span.
        """
        if not 0 <= lo < hi <= self.a.shape[0]:
            raise ValueError(
                f"rows {lo}..{hi - 1} are not within the cache's {self.a.shape[0]} rows"
            )
        view = copy.copy(self)
        view.a, view.b = self.a[lo:hi], self.b[lo:hi]
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` to row ``dst`` (fork a prefix)."""
        self.a[dst, :length] = self.a[src, :length]
        self.b[dst, :length] = self.b[src, :length]

    def nbytes(self) -> int:
        """Bytes held by this layer's buffers."""
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


class KVCache(_StaticCache):
    """Keys and values of one GQA layer: ``k``, ``v`` each ``(B, S, n_kv_heads, head_dim)``."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, **kw) -> None:
        shape = (batch, max_seq_len, n_kv_heads, head_dim)
        super().__init__(torch.zeros(shape, **kw), torch.zeros(shape, **kw))

    @property
    def k(self) -> torch.Tensor:
        """Keys ``(B, S, n_kv_heads, head_dim)``."""
        return self.a

    @property
    def v(self) -> torch.Tensor:
        """Values ``(B, S, n_kv_heads, head_dim)``."""
        return self.b

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, Hkv, T, D)`` at ``positions`` ``(B, T)``.

        Returns ``(k_all, v_all, key_positions)``: ``(B, Hkv, S, D)`` views up to the longest
        written position and ``(S,)``.
        """
        ka, va, pos = self._write(positions, k.transpose(1, 2), v.transpose(1, 2))
        return ka.transpose(1, 2), va.transpose(1, 2), pos


class MLACache(_StaticCache):
    """Latent cache of one MLA layer: ``c_kv`` ``(B, S, kv_lora_rank)``, ``k_pe`` ``(B, S, rope)``."""

    def __init__(
        self, batch: int, max_seq_len: int, kv_lora_rank: int, rope_dim: int, **kw
    ) -> None:
        super().__init__(
            torch.zeros(batch, max_seq_len, kv_lora_rank, **kw),
            torch.zeros(batch, max_seq_len, rope_dim, **kw),
        )

    @property
    def c_kv(self) -> torch.Tensor:
        """Normalised latents ``(B, S, kv_lora_rank)``."""
        return self.a

    @property
    def k_pe(self) -> torch.Tensor:
        """Rotated shared RoPE keys ``(B, S, qk_rope_head_dim)``."""
        return self.b

    def update(
        self, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``c_kv`` ``(B, T, r)`` and ``k_pe`` ``(B, T, rope)`` at ``positions`` ``(B, T)``."""
        return self._write(positions, c_kv, k_pe)


class IndexedMLACache(MLACache):
    """MLA's latent cache plus the lightning indexer's keys ``index_k`` ``(B, S, index_head_dim)``
    of one DeepSeek-V3.2 layer (DeepSeek-V3.2 §2.1: the indexer scores every cached token with
    ``H_I`` query heads against this one key per token)."""

    def __init__(
        self,
        batch: int,
        max_seq_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        index_head_dim: int,
        **kw,
    ) -> None:
        super().__init__(batch, max_seq_len, kv_lora_rank, rope_dim, **kw)
        self.c = torch.zeros(batch, max_seq_len, index_head_dim, **kw)

    @property
    def index_k(self) -> torch.Tensor:
        """Normalised, rotated indexer keys ``(B, S, index_head_dim)``."""
        return self.c

    def update_index(self, positions: torch.Tensor, index_k: torch.Tensor) -> torch.Tensor:
        """Store indexer keys ``(B, T, index_head_dim)`` at ``positions`` ``(B, T)``; return the
        rows' keys ``(B, S, index_head_dim)`` over the same ``S`` slots :meth:`update` returns."""
        kv_len = self._store(self.c, positions, index_k)
        return self.c[: positions.shape[0], :kv_len]

    def rows(self, lo: int, hi: int) -> IndexedMLACache:
        view = super().rows(lo, hi)
        view.c = self.c[lo:hi]
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        super().copy_row(src, dst, length)
        self.c[dst, :length] = self.c[src, :length]

    def nbytes(self) -> int:
        return super().nbytes() + self.c.numel() * self.c.element_size()


def cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Cache bytes per token (all layers) for ``config``, for V3's MLA cache of the same shape,
    and for a same-shape MHA model.

    MLA caches ``kv_lora_rank + qk_rope_head_dim`` values per layer (DeepSeek-V2 §2.1.2, Table 1);
    DeepSeek-V3.2 adds the indexer key, ``index_head_dim`` values (DeepSeek-V3.2 §2.1); multi-head
    attention of the same shape would cache keys ``n_heads * qk_head_dim`` plus values
    ``n_heads * v_head_dim``. GQA models cache ``2 * n_kv_heads * head_dim``.

    Returns ``{"cache": bytes, "mla": bytes, "mha": bytes}`` per token (``mla`` equals ``cache``
    for V2/V3 and is absent for GQA models).
    """
    layers = config.num_hidden_layers
    out = {}
    if config.is_mla:
        mla = config.kv_lora_rank + config.qk_rope_head_dim
        ours = mla + (config.index_head_dim if config.is_sparse_attention else 0)
        mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        out["mla"] = mla * layers * dtype_bytes
    else:
        ours = 2 * config.num_key_value_heads * config.head_dim
        mha = 2 * config.num_attention_heads * config.head_dim
    return {"cache": ours * layers * dtype_bytes, **out, "mha": mha * layers * dtype_bytes}


def make_cache(
    config: ModelConfig,
    batch: int,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[KVCache | MLACache | IndexedMLACache]:
    """Allocate one cache per decoder layer.

    Memory per token and layer: ``2 * n_kv_heads * head_dim`` elements for GQA,
    ``kv_lora_rank + qk_rope_head_dim`` for MLA, plus ``index_head_dim`` for DeepSeek-V3.2.
    """
    kw = {"dtype": dtype, "device": device}
    if config.is_sparse_attention:
        return [
            IndexedMLACache(
                batch,
                max_seq_len,
                config.kv_lora_rank,
                config.qk_rope_head_dim,
                config.index_head_dim,
                **kw,
            )
            for _ in range(config.num_hidden_layers)
        ]
    if config.is_mla:
        return [
            MLACache(batch, max_seq_len, config.kv_lora_rank, config.qk_rope_head_dim, **kw)
            for _ in range(config.num_hidden_layers)
        ]
    return [
        KVCache(batch, max_seq_len, config.num_key_value_heads, config.head_dim, **kw)
        for _ in range(config.num_hidden_layers)
    ]
