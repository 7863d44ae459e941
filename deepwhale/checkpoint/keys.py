"""Checkpoint key conversion, described as data.

Our module names mirror the HF checkpoint keys, so the map is the identity except for:

* fused experts as transformers 5.x holds them in memory: ``mlp.experts.gate_up_proj``
  ``(E, 2I, H)`` and ``mlp.experts.down_proj`` ``(E, H, I)`` are split into the Hub's one tensor
  per expert, ``mlp.experts.{j}.{gate,up,down}_proj.weight``;
* DeepSeek-V3's multi-token-prediction layers (``model.layers.{n}`` with ``n >=
  num_hidden_layers``, :func:`is_mtp_key`) are skipped unless the loader is asked for them
  (``load_model(..., load_mtp=True)``); then they load by identity into
  :class:`~deepwhale.model.mtp.MultiTokenPredictor`, whose keys are the checkpoint's;
* FP8 block scales (``*.weight_scale_inv``) are consumed by dequantization, not loaded.

Reference for the FP8 format: DeepSeek-V3 ``inference/convert.py`` and ``fp8_cast_bf16.py``
(``float8_e4m3fn`` weights; one fp32 inverse scale per 128x128 block; ``w = q * scale``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_index(key: str) -> int | None:
    """The decoder layer number in ``key`` (``model.layers.{i}.``), or None."""
    m = _LAYER.match(key)
    return int(m.group(1)) if m else None


def hf_to_ours(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one HF checkpoint tensor to ``(our_key, tensor)`` pairs (usually exactly one).

    Fused expert tensors ``(E, 2I, H)`` / ``(E, H, I)`` yield ``E`` (or ``2E``) per-expert tensors.
    """
    m = _FUSED.match(key)
    if m is None:
        yield key, tensor
        return
    prefix, kind = m.groups()
    if kind == "gate_up_proj":  # (E, 2I, H): gate rows first, then up rows
        inter = tensor.shape[1] // 2
        for j in range(tensor.shape[0]):
            yield f"{prefix}.{j}.gate_proj.weight", tensor[j, :inter]
            yield f"{prefix}.{j}.up_proj.weight", tensor[j, inter:]
    else:  # (E, H, I)
        for j in range(tensor.shape[0]):
            yield f"{prefix}.{j}.down_proj.weight", tensor[j]


def is_mtp_key(key: str, num_hidden_layers: int, num_mtp_layers: int) -> bool:
    """True for a key of DeepSeek-V3's multi-token-prediction modules, layers
    ``num_hidden_layers .. num_hidden_layers + num_mtp_layers - 1`` (DeepSeek-V3 §2.2)."""
    idx = layer_index(key)
    return idx is not None and num_hidden_layers <= idx < num_hidden_layers + num_mtp_layers


def is_skipped(key: str, num_hidden_layers: int, num_mtp_layers: int = 0) -> bool:
    """True for keys inference ignores: rotary caches, FP8 scale tensors, and DeepSeek-V3's
    multi-token-prediction layers ``num_hidden_layers .. num_hidden_layers + num_mtp_layers - 1``.
    Any other layer past the config's depth is not skipped, so it is reported as unexpected."""
    if key.endswith(IGNORED_SUFFIXES) or key.endswith("weight_scale_inv"):
        return True
    return is_mtp_key(key, num_hidden_layers, num_mtp_layers)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Dequantize a block-scaled FP8 weight to fp32.

    Args:
        weight: ``(out, in)`` ``float8_e4m3fn`` tensor.
        scale_inv: ``(ceil(out / bo), ceil(in / bi))`` fp32 per-block multipliers.
        block: ``(bo, bi)``, the ``weight_block_size`` of the config's ``quantization_config``.

    Returns:
        ``(out, in)`` fp32: ``weight * scale_inv`` broadcast over each block.

    Raises:
        ValueError: the scale's shape does not tile the weight.
    """
    out_f, in_f = weight.shape
    bo, bi = block
    expected = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
            f"({out_f}, {in_f}) weight in {bo}x{bi} blocks"
        )
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return weight.float() * scale


def quantize_fp8(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled FP8 quantization, the inverse of :func:`dequantize_fp8` (used for tests and
    export): each block is scaled so that its absolute max maps to 448, the e4m3 maximum.

    Returns ``(q, scale_inv)``: ``(out, in)`` ``float8_e4m3fn`` and the per-block fp32 scales.
    """
    out_f, in_f = weight.shape
    bo, bi = block
    nb_o, nb_i = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(nb_o * bo, nb_i * bi, dtype=torch.float32)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(nb_o, bo, nb_i, bi)  # (No, bo, Ni, bi)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (No, Ni)
    scale_inv = amax / 448.0
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn), scale_inv
