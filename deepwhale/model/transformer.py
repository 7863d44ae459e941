"""Decoder layer and causal language model for every deepwhale layout.

Pure single-device ``nn.Module`` code: no file I/O, no torch.distributed, no globals. Parallelism,
quantization and compilation are applied from outside. Attribute names mirror HF checkpoint keys
(``model.embed_tokens``, ``model.layers.{i}.self_attn.*``, ``model.layers.{i}.mlp.*``,
``model.norm``, ``lm_head``), so loading a checkpoint is an identity map.
"""

from __future__ import annotations

import torch
from torch import nn

from deepwhale.model.attention import MLA, Attention
from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import MLP, RMSNorm, RotaryEmbedding
from deepwhale.model.moe import MoE


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    The attention is :class:`MLA` for deepseek_v2/v3 and :class:`Attention` otherwise; the MLP is
    :class:`MoE` on MoE layers (``config.is_moe_layer``) and a dense SwiGLU :class:`MLP` otherwise.
    Shapes: ``(B, T, H) -> (B, T, H)``.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLA(config) if config.is_mla else Attention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache=None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embedding, decoder layers and final norm (HF's ``model.*`` prefix).

    ``forward(input_ids (B, T), positions (B, T), caches)`` returns hidden states ``(B, T, H)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, caches=None
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary_emb(positions)  # (B, T, rope_dim/2)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, None if caches is None else caches[i])
        return self.norm(x)


class CausalLM(nn.Module):
    """A DeepSeek-family causal language model: ``model`` (:class:`DecoderStack`) + ``lm_head``.

    Args:
        config: a validated :class:`~deepwhale.model.config.ModelConfig`.

    With ``tie_word_embeddings`` the ``lm_head`` shares the embedding matrix.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: ``(B, T)`` token ids.
            positions: ``(B, T)`` absolute positions, tokens; default ``0..T-1`` for every row.
            caches: per-layer caches from :func:`deepwhale.model.cache.make_cache`, or None to
                attend only within ``input_ids``.
            last_only: return logits for the last position only, ``(B, 1, V)``.

        Returns:
            ``(B, T, V)`` logits in the model's dtype.

        Raises:
            ValueError: a token id outside ``[0, vocab_size)``, or a position past the cache.
        """
        h = self.hidden_states(input_ids, positions, caches)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        caches: list | None = None,
    ) -> torch.Tensor:
        """The final hidden states, after the final norm: what ``lm_head`` maps to logits.

        Args and errors as :meth:`forward`. Returns ``(B, T, H)`` in the model's dtype.
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}"
            )
        checked = input_ids.numel() and not torch.compiler.is_compiling()  # no graph break
        if checked and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
        return self.model(input_ids, positions, caches)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) weights, zero biases, unit norms) for from-scratch models."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)


def num_parameters(config: ModelConfig) -> int:
    """Parameter count of :class:`CausalLM` for ``config`` (embeddings and ``lm_head``
    included; a tied ``lm_head`` counted once), built on the meta device, so no memory is used."""
    with torch.device("meta"):
        return sum(p.numel() for p in CausalLM(config).parameters())
