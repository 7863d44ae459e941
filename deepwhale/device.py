"""Which device and dtype a model runs in: the one place that resolves ``--device`` /
``train.device`` and ``--dtype`` for loading, serving, evaluation and training."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> str:
    """``None`` or ``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; otherwise the
    device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``) after checking it.

    Raises:
        ValueError: an unknown device string, a device type other than cpu/cuda, or CUDA asked
            for where none is available.
    """
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return str(dev)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` -> fp32 on CPU (bf16 matmul is ~100x slower there), bf16 on CUDA.

    Raises:
        ValueError: an unknown dtype name, or a non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None
