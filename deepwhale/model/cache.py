"""Static per-layer caches, allocated once for ``(max_batch_size, max_seq_len)`` and written in place.

* :class:`KVCache` holds keys and values ``(B, S, n_kv_heads, head_dim)`` for GQA layers.
* :class:`MLACache` holds MLA's compressed latent ``(B, S, kv_lora_rank)`` and the shared RoPE key
  ``(B, S, qk_rope_head_dim)`` (DeepSeek-V2 §2.1.2, "low-rank key-value joint compression").

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
        bsz = positions.shape[0]
        lo, hi = 0, bsz
        if hi > self.a.shape[0]:
            raise ValueError(f"rows {lo}..{hi - 1} exceed the cache's {self.a.shape[0]} rows")
        if self.static_len:
            kv_len = self.max_seq_len
        else:
            kv_len = int(positions.max()) + 1
            if kv_len > self.max_seq_len:
                raise ValueError(
                    f"position {kv_len - 1} is past the cache's max_seq_len {self.max_seq_len}"
                )
        rows = torch.arange(lo, hi, device=positions.device)[:, None]  # (B, 1)
        self.a[rows, positions] = a_new.to(self.a.dtype)
        self.b[rows, positions] = b_new.to(self.b.dtype)
        return self.a[lo:hi, :kv_len], self.b[lo:hi, :kv_len], self.positions[:kv_len]

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


def cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Cache bytes per token (all layers) for ``config``, and for a same-shape MHA model.

    MLA caches ``kv_lora_rank + qk_rope_head_dim`` values per layer (DeepSeek-V2 §2.1.2, Table 1);
    multi-head attention of the same shape would cache keys ``n_heads * qk_head_dim`` plus values
    ``n_heads * v_head_dim``. GQA models cache ``2 * n_kv_heads * head_dim``.

    Returns ``{"cache": bytes, "mha": bytes}`` per token.
    """
    layers = config.num_hidden_layers
    if config.is_mla:
        ours = config.kv_lora_rank + config.qk_rope_head_dim
        mha = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        ours = 2 * config.num_key_value_heads * config.head_dim
        mha = 2 * config.num_attention_heads * config.head_dim
    return {"cache": ours * layers * dtype_bytes, "mha": mha * layers * dtype_bytes}


def make_cache(
    config: ModelConfig,
    batch: int,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[KVCache | MLACache]:
    """Allocate one cache per decoder layer.

    Memory per token and layer: ``2 * n_kv_heads * head_dim`` elements for GQA, and
    ``kv_lora_rank + qk_rope_head_dim`` for MLA.
    """
    kw = {"dtype": dtype, "device": device}
    if config.is_mla:
        return [
            MLACache(batch, max_seq_len, config.kv_lora_rank, config.qk_rope_head_dim, **kw)
            for _ in range(config.num_hidden_layers)
        ]
    return [
        KVCache(batch, max_seq_len, config.num_key_value_heads, config.head_dim, **kw)
        for _ in range(config.num_hidden_layers)
    ]
