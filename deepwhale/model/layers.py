"""Building blocks shared by every layout: RMSNorm, rotary position embeddings, SwiGLU MLP.

References: RMSNorm (Zhang & Sennrich 2019); RoPE (Su et al., arXiv:2104.09864); linear position
interpolation (Chen et al., arXiv:2306.15595); Llama 3.1 frequency scaling; YaRN
(Peng et al., arXiv:2309.00071) with DeepSeek's ``mscale``/``mscale_all_dim`` (DeepSeek-V2 appendix);
SwiGLU (Shazeer, arXiv:2002.05202).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepwhale.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32: ``w * x / rms(x)``.

    Args:
        dim: width of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.

    Shapes: ``(..., dim) -> (..., dim)`` in the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``).

    Source: YaRN paper (arXiv:2309.00071) eq. 22, as DeepSeek-V2/V3 use it with ``mscale`` and
    ``mscale_all_dim``.
    """
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and the cos/sin scale ("attention factor") for ``config``.

    Returns:
        ``(inv_freq, attention_factor)``: ``inv_freq`` has shape ``(rope_dim // 2,)`` in fp32,
        radians per token; ``attention_factor`` multiplies cos and sin (YaRN's temperature,
        1.0 for the other types).

    Supports ``default``, ``linear``, ``llama3`` and ``yarn`` (the config validates the type).
    For YaRN the factor is ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``, the
    DeepSeek-V2 reference formula; with neither key it is YaRN's ``0.1 ln(factor) + 1``.
    """
    dim = config.rope_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = config.rope_type
    rs = config.rope_scaling or {}
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(rs["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        old_len = rs["original_max_position_embeddings"]
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        low_freq_wavelen = old_len / low
        high_freq_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    original = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale = rs.get("mscale") or 1.0
        mscale_all_dim = rs.get("mscale_all_dim") or 0.0
        attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low_dim, high_dim = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low_dim, high_dim = math.floor(low_dim), math.ceil(high_dim)
    low_dim, high_dim = max(low_dim, 0), min(high_dim, dim - 1)
    if low_dim == high_dim:
        high_dim += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low_dim) / (high_dim - low_dim)).clamp(
        0, 1
    )
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """Attention logit scale ``1/sqrt(qk_head_dim)``, times ``mscale_all_dim``'s YaRN factor squared
    for MLA models with YaRN (DeepSeek-V2 reference ``softmax_scale``)."""
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling or {}
    if config.is_mla and config.rope_type != "default" and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rs["factor"]), rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Computes RoPE cos/sin tables for the given positions.

    Args:
        config: the model config (``rope_dim``, ``rope_theta``, ``rope_scaling``).
        device: where to build ``inv_freq``.

    ``forward(positions)`` takes integer positions of shape ``(B, T)`` (or ``(T,)``) and returns
    ``(cos, sin)``, each ``(B, T, rope_dim // 2)`` (or ``(T, rope_dim // 2)``) in fp32, already
    multiplied by the YaRN attention factor.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (..., T, rope_dim/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool
) -> torch.Tensor:
    """Rotate ``x`` by the position angles.

    Args:
        x: ``(B, heads, T, rope_dim)``.
        cos, sin: ``(B, T, rope_dim // 2)`` from :class:`RotaryEmbedding`.
        interleave: rotate adjacent pairs ``(x0, x1), (x2, x3)...`` (DeepSeek-V2/V3 and llama2.c);
            otherwise rotate the two halves (HF LLaMA/Qwen2 layout).

    Returns a tensor of ``x``'s shape and dtype. The interleaved output is written de-interleaved
    (evens then odds), as DeepSeek's reference code does before attention; queries and keys get the
    same permutation, so dot products are unchanged.
    """
    cos = cos.unsqueeze(1)  # (B, 1, T, D/2)
    sin = sin.unsqueeze(1)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` float weight of a linear layer: ``layer.weight`` for
    an ``nn.Linear``, or what ``layer.dequantized_weight()`` returns for a layer that stores its
    weight another way (a quantized linear owns that conversion, the model does not)."""
    dequantized = getattr(layer, "dequantized_weight", None)
    return dequantized() if dequantized is not None else layer.weight


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

    Shapes: ``(..., hidden_size) -> (..., hidden_size)``; ``intermediate_size`` inside.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
