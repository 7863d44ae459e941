"""INT8 checkpoints on disk: the HF-style folder :func:`save_quantized` writes and the tensors
:func:`read_quantized_state` reads back, checked against the model they are for.

Layout: ``config.json`` has ``quantization_config = {"quant_method": "deepwhale-int8", "mode":
"int8" | "int8-dynamic", "lm_head": bool}``; each quantized ``X.weight`` is int8 ``(out, in)``
beside ``X.weight_scale`` fp32 ``(out,)`` (one symmetric absmax scale per output channel);
every other tensor is as :func:`~deepwhale.checkpoint.io.save_model` writes it. The kernels
that run such a model are :mod:`deepwhale.inference.quantize`, which builds the module and
calls this reader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.io import FP32_KEYS, write_checkpoint
from deepwhale.model.config import ModelConfig
from deepwhale.model.transformer import CausalLM

QUANT_METHOD = "deepwhale-int8"
MODES = ("int8", "int8-dynamic")
SCALE_SUFFIX = "_scale"  # ``X.weight`` -> ``X.weight_scale``


def quantization_config(module: CausalLM) -> dict:
    """The ``quantization_config`` written to ``config.json`` for a quantized module.

    Raises:
        ValueError: ``module`` was not quantized (it has no ``.quantization`` record).
    """
    q = getattr(module, "quantization", None)
    if not q:
        raise ValueError("the model is not quantized; call quantize_model(module, mode) first")
    return {"quant_method": QUANT_METHOD, "mode": q["mode"], "lm_head": bool(q["lm_head"])}


def save_quantized(
    module: CausalLM, folder: str | Path, max_shard_size: int = 5 * 1024**3
) -> list[Path]:
    """Write a quantized model as a HF-style folder.

    ``config.json`` gets ``quantization_config = {"quant_method": "deepwhale-int8", "mode": ...,
    "lm_head": ...}``; the safetensors hold each quantized ``X.weight`` as int8 ``(out, in)`` with
    ``X.weight_scale`` fp32 ``(out,)``, everything else as in :func:`~deepwhale.checkpoint.io.
    save_model` (tied ``lm_head.weight`` omitted unless the head is quantized). Files are written
    to a temporary name and renamed; above ``max_shard_size`` bytes, shards plus
    ``model.safetensors.index.json``. An attached MTP module (``module.mtp``, from
    ``load_model(..., load_mtp=True)``) is not written: int8 checkpoints do not carry one yet.

    Returns:
        The written weight files.

    Raises:
        ValueError: the module is not quantized.
    """
    qcfg = quantization_config(module)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("mtp.")}
    if module.config.tie_word_embeddings and not qcfg["lm_head"]:
        state.pop("lm_head.weight", None)
    cfg = module.config.to_hf()
    cfg["quantization_config"] = qcfg
    cfg["torch_dtype"] = str(module.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return write_checkpoint(folder, state, cfg, max_shard_size)


def is_quantized_checkpoint(config: ModelConfig) -> bool:
    """True when ``config.quantization_config`` names ``quant_method: "deepwhale-int8"``.

    For the loader's dispatch: ``if is_quantized_checkpoint(config): return load_quantized(...)``.
    """
    qc = config.quantization_config
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_quantization_config(config: ModelConfig, source: Path) -> tuple[str, bool]:
    """``(mode, lm_head)`` from ``config.quantization_config``.

    Raises:
        CheckpointError: another ``quant_method``, an unknown mode, or a non-boolean
            ``lm_head`` (the message names ``source``).
    """
    qc = config.quantization_config
    if not is_quantized_checkpoint(config):
        raise CheckpointError(
            f"{source}: quantization_config.quant_method must be {QUANT_METHOD!r}, got "
            f"{(qc or {}).get('quant_method') if isinstance(qc, dict) else qc!r}"
        )
    mode = qc.get("mode")
    if mode not in MODES:
        raise CheckpointError(
            f"{source}: unknown quantization mode {mode!r} in quantization_config; "
            f"use one of {', '.join(MODES)}"
        )
    lm_head = qc.get("lm_head", False)
    if not isinstance(lm_head, bool):
        raise CheckpointError(f"{source}: quantization_config.lm_head must be true or false")
    return mode, lm_head


def read_quantized_state(
    folder: Path,
    files: list[Path],
    expected: dict[str, torch.Tensor],
    tied: bool,
    dtype: torch.dtype,
    device: str,
) -> dict[str, torch.Tensor]:
    """Read and check every tensor of a quantized checkpoint.

    Args:
        folder: the checkpoint folder (for messages).
        files: its safetensors files (:func:`~deepwhale.checkpoint.io.checkpoint_files`).
        expected: the target module's ``state_dict()`` (meta tensors are fine): the keys and
            shapes wanted; a key ``K`` with ``K + "_scale"`` beside it is an int8 weight.
        tied: ``lm_head.weight`` is the embedding and is not stored.
        dtype: dtype of the float tensors (the router's stay fp32).
        device: where safetensors maps the tensors (``cpu`` or a CUDA device).

    Returns:
        ``{key: tensor}`` for every stored key.

    Raises:
        CheckpointError: an unreadable file or tensor; a missing, unexpected or wrongly shaped
            tensor; an int8 weight that is not int8 or whose scale is missing or not fp32 (the
            message names the key and the file).
    """
    needed = set(expected) - ({"lm_head.weight"} if tied else set())
    quantized = {k for k in expected if k + SCALE_SUFFIX in expected}
    loaded: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    unexpected: list[str] = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=device)
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            for key in f.keys():
                if key not in needed:
                    unexpected.append(f"{key} (in {file.name})")
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from e
                loaded[key] = _check_tensor(key, t, expected[key], quantized, file, dtype)
                source[key] = file
    if unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
            + ", ".join(unexpected[:5])
        )
    missing = sorted(needed - set(loaded))
    for key in missing:
        weight = key.removesuffix(SCALE_SUFFIX)
        if key.endswith(".weight" + SCALE_SUFFIX) and weight in source:
            raise CheckpointError(
                f"{source[weight]}: quantized weight {weight!r} has no scale {key!r}"
            )
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensor(s) missing from "
            f"{', '.join(p.name for p in files)}, e.g. {', '.join(missing[:5])}"
        )
    return loaded


def _check_tensor(
    key: str,
    t: torch.Tensor,
    want: torch.Tensor,
    quantized: set[str],
    file: Path,
    dtype: torch.dtype,
) -> torch.Tensor:
    if tuple(t.shape) != tuple(want.shape):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(t.shape)}, but this config needs "
            f"{tuple(want.shape)}"
        )
    if key in quantized or key.endswith(".weight" + SCALE_SUFFIX):
        need = torch.int8 if key in quantized else torch.float32
        if t.dtype != need:
            raise CheckpointError(
                f"{file}: quantized tensor {key!r} has dtype {t.dtype}, expected {need}"
            )
        return t
    if not t.is_floating_point():
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {t.dtype}, expected a float")
    return t.to(torch.float32 if key.endswith(FP32_KEYS) else dtype)
