"""DeepSeek-V3's multi-token-prediction (MTP) module (DeepSeek-V3 tech report §2.2).

The ``k``-th MTP module predicts the token ``k + 1`` places ahead. At position ``i`` it combines
the previous depth's representation ``h_i`` (for ``k = 1`` the main model's final hidden state)
with the embedding of token ``t_{i+k}``::

    h'_i = eh_proj(cat([enorm(embed_tokens(t_{i+k})), hnorm(h_i)], -1))     # (B, T, 2H) -> (B, T, H)
    g_i  = TRM(h'_i)                        # one decoder layer of the model's own kind (MLA + MoE)
    logits_i = shared_head.head(shared_head.norm(g_i))                    # (B, T, V)

The concatenation order, normalised embedding first and then the normalised hidden state, and
the use of the main model's *post-final-norm* hidden state follow vLLM's
``vllm/model_executor/models/deepseek_mtp.py`` (``DeepSeekMultiTokenPredictorLayer.forward``),
read as the reference for the released checkpoints. The report's eq. (21) writes the pair the
other way round, ``[RMSNorm(h); RMSNorm(Emb(t))]``; the checkpoints' ``eh_proj`` columns follow
the engines' order, which is what matters for loading them.

HF checkpoints hold module ``k`` under ``model.layers.{num_hidden_layers + k}``:
``enorm``, ``hnorm``, ``eh_proj``, ``embed_tokens``, ``shared_head.norm``, ``shared_head.head``
and the decoder layer's own ``self_attn.*``, ``mlp.*``, ``input_layernorm``,
``post_attention_layernorm``. :class:`MultiTokenPredictor`'s ``state_dict`` keys are exactly those
keys, so loading is an identity map (see :func:`deepwhale.checkpoint.io.load_model`,
``load_mtp=True``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deepwhale.model.cache import make_cache
from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import RMSNorm, RotaryEmbedding
from deepwhale.model.transformer import DecoderLayer


class SharedHead(nn.Module):
    """The MTP module's output head: ``head(norm(x))``, ``(..., H) -> (..., V)`` logits.

    In DeepSeek-V3 it is shared with the main model's ``lm_head`` in training; the checkpoint
    stores a copy per module (``shared_head.head.weight``), loaded as its own tensor.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def _layer_config(config: ModelConfig, num_layers: int | None = None) -> ModelConfig:
    """``config`` with ``num_layers`` layers (default: the main layers plus the MTP modules).

    Per-layer lists (deepseek_v32's ``mlp_layer_types``) cover the main model's layers only; the
    MTP modules are MoE layers (``"sparse"``), as in every released DeepSeek-V3/V3.2 checkpoint.
    """
    n, d = config.num_hidden_layers, config.num_nextn_predict_layers
    num_layers = n + d if num_layers is None else num_layers
    changes: dict = {"num_hidden_layers": num_layers}
    if config.mlp_layer_types is not None:
        kind = "sparse" if config.n_routed_experts else "dense"
        changes["mlp_layer_types"] = (list(config.mlp_layer_types) + [kind] * d)[-num_layers:]
    return dataclasses.replace(config, **changes)


class MTPLayer(DecoderLayer):
    """One MTP module: the decoder layer of the main model's kind plus ``enorm``, ``hnorm``,
    ``eh_proj`` ``(H, 2H)``, its own ``embed_tokens`` ``(V, H)`` and ``shared_head``.

    Args:
        config: the main model's config.
        layer_idx: the checkpoint layer number, ``num_hidden_layers + k``.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(_layer_config(config), layer_idx)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache=None,
    ) -> torch.Tensor:
        """``input_ids`` ``(B, T)`` (the tokens one place ahead of ``hidden``), ``hidden``
        ``(B, T, H)``, RoPE tables ``(B, T, rope_dim/2)``, ``positions`` ``(B, T)`` (those of
        ``hidden``); returns the layer output ``g`` ``(B, T, H)``, before ``shared_head``."""
        e = self.enorm(self.embed_tokens(input_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], dim=-1))
        return super().forward(x, cos, sin, positions, cache)


class _Layers(nn.Module):
    """Holds ``layers`` (an ``nn.ModuleDict`` keyed by the checkpoint layer number) so that the
    keys read ``model.layers.{n}.*`` as in the checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n = config.num_hidden_layers
        self.layers = nn.ModuleDict(
            {str(n + k): MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers)}
        )


class MultiTokenPredictor(nn.Module):
    """The ``num_nextn_predict_layers`` MTP modules of a DeepSeek-V3 model.

    Args:
        config: the main model's config; ``num_nextn_predict_layers`` must be at least 1.

    Raises:
        ValueError: the config has no MTP layers.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.num_nextn_predict_layers < 1:
            raise ValueError(
                "num_nextn_predict_layers is 0: this config has no multi-token-prediction module"
            )
        self.config = config
        self.model = _Layers(config)
        self.rotary_emb = RotaryEmbedding(config)

    @property
    def depth(self) -> int:
        """Number of MTP modules ``D`` (``num_nextn_predict_layers``)."""
        return len(self.model.layers)

    def layer(self, k: int = 0) -> MTPLayer:
        """MTP module ``k`` (0-based; checkpoint layer ``num_hidden_layers + k``).

        Raises:
            IndexError: ``k`` outside ``0 .. depth - 1``.
        """
        if not 0 <= k < self.depth:
            raise IndexError(f"MTP module {k} does not exist; this model has {self.depth}")
        return self.model.layers[str(self.config.num_hidden_layers + k)]

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init as :meth:`CausalLM.init_weights` (normal(0, std) weights, unit norms)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        k: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run MTP module ``k``.

        Args:
            input_ids: ``(B, T)`` token ids ``t_{i+1}``, one place ahead of ``hidden``.
            hidden: ``(B, T, H)`` the previous depth's representation ``h_i`` (for ``k = 0`` the
                main model's final hidden state, :meth:`CausalLM.hidden_states`).
            positions: ``(B, T)`` positions ``i`` of ``hidden``; default ``0 .. T-1``.
            cache: this module's cache (one layer of :func:`make_mtp_cache`), or None.
            k: which module (0-based).

        Returns:
            ``(g, logits)``: the module output ``(B, T, H)`` (the next depth's ``h``) and the
            logits ``(B, T, V)`` for the token two places past ``hidden`` (``k + 2`` in general).

        Raises:
            ValueError: shapes that do not line up, or a token id outside ``[0, vocab_size)``.
        """
        if input_ids.dim() != 2 or hidden.shape[:2] != input_ids.shape:
            raise ValueError(
                f"input_ids (B, T) and hidden (B, T, H) must line up, got {tuple(input_ids.shape)}"
                f" and {tuple(hidden.shape)}"
            )
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        cos, sin = self.rotary_emb(positions)
        layer = self.layer(k)
        g = layer(input_ids, hidden, cos, sin, positions, cache)
        return g, layer.shared_head(g)


def make_mtp_cache(
    config: ModelConfig,
    batch: int,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list:
    """One cache per MTP module, of the kind the main model's layers use (MLA latents for V3).

    Returns a list of ``num_nextn_predict_layers`` caches, each ``(batch, max_seq_len, ...)``.
    """
    cfg = _layer_config(config, config.num_nextn_predict_layers)
    return make_cache(cfg, batch, max_seq_len, dtype=dtype, device=device)
