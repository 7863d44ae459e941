"""Read and write HF-layout safetensors checkpoints (single file or sharded with an index).

Loading builds the model on the ``meta`` device (no random init, no double allocation), reads
each tensor through safetensors' memory map, dequantizes FP8 block-scaled weights, and assigns
the tensors in place. Every mismatch is an error that names the key and the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepwhale.atomic import atomic_write, write_json  # noqa: F401  (re-exported)
from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.keys import dequantize_fp8, hf_to_ours, is_mtp_key, is_skipped
from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import RotaryEmbedding
from deepwhale.model.mtp import MultiTokenPredictor
from deepwhale.model.transformer import CausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: keys kept in fp32 whatever the load dtype (the router math; DeepSeek-V3.2's indexer head weights,
#: as transformers keeps them)
FP32_KEYS = (
    "mlp.gate.weight",
    "mlp.gate.e_score_correction_bias",
    "self_attn.indexer.weights_proj.weight",
)
_FP32_KEYS = FP32_KEYS  # the old private name
_FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}
#: where :func:`load_model` puts the MTP modules on the model (``model.mtp``); the module's own
#: keys are the checkpoint's (``model.layers.{n}.*``), so ours are ``mtp.`` + the HF key
MTP_PREFIX = "mtp."


def checkpoint_files(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """The safetensors files of a checkpoint folder and, for sharded ones, key -> file.

    Raises:
        CheckpointError: no safetensors files, a malformed index, or a shard the index names
            that is missing.
    """
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        key_to_file = {k: folder / v for k, v in weight_map.items()}
        files = sorted(set(key_to_file.values()))
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing")
        return files, key_to_file
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME], {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: re-save it as safetensors)" if bins else ""
        raise CheckpointError(f"{folder}: no *.safetensors files{hint}")
    return files, {}


def _open(path: Path, device: str = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt"
        ) from e


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_mtp: bool = False,
) -> CausalLM:
    """Load ``config.json`` + safetensors from ``folder`` into a :class:`CausalLM`.

    Args:
        folder: a local checkpoint folder (see :func:`deepwhale.checkpoint.hub.resolve_checkpoint`).
        dtype: parameter dtype (router weights stay fp32). FP8 weights are dequantized to it.
        device: target device.
        load_mtp: also load DeepSeek-V3's multi-token-prediction modules
            (``model.layers.{num_hidden_layers + k}.*``, DeepSeek-V3 §2.2) into ``model.mtp``, a
            :class:`~deepwhale.model.mtp.MultiTokenPredictor`. By default they are skipped and the
            model has no ``mtp`` attribute.

    Returns:
        The model in eval mode.

    Raises:
        ConfigError: config.json is missing, malformed or unsupported.
        CheckpointError: a truncated or unreadable file, or a missing, unexpected or wrongly
            shaped tensor (the message names the key and the file); with ``load_mtp``, a
            checkpoint without MTP modules (``num_nextn_predict_layers`` 0, not a DeepSeek-V3
            family model, or no ``model.layers.{n}.*`` tensors).
    """
    folder = Path(folder)
    config = ModelConfig.from_json_file(folder / "config.json")
    files, key_to_file = checkpoint_files(folder)
    mtp = config.num_nextn_predict_layers if config.model_type.startswith("deepseek_v3") else 0
    if load_mtp and not mtp:
        raise CheckpointError(
            f"{folder}: load_mtp=True, but this checkpoint has no multi-token-prediction module "
            f"(model_type {config.model_type!r}, num_nextn_predict_layers "
            f"{config.num_nextn_predict_layers}); MTP modules exist for DeepSeek-V3/V3.2 "
            "checkpoints that ship them"
        )
    with torch.device("meta"):
        model = CausalLM(config)
        if load_mtp:
            model.mtp = MultiTokenPredictor(config)
    expected = model.state_dict()
    tied = config.tie_word_embeddings
    block = tuple((config.quantization_config or {}).get("weight_block_size", (128, 128)))
    load_device = str(device) if str(device).startswith("cuda") else "cpu"
    loaded: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}
    unexpected: list[str] = []
    for file in files:
        with _open(file, load_device) as f:
            for key in f.keys():
                if key_to_file and key_to_file.get(key) != file:
                    where = key_to_file.get(key)
                    raise CheckpointError(
                        f"{file}: holds tensor {key!r}, but the index maps it to "
                        f"{where.name if where else 'no file'}; the index and shards disagree"
                    )
                in_mtp = is_mtp_key(key, config.num_hidden_layers, mtp)
                if in_mtp and not load_mtp or is_skipped(key, config.num_hidden_layers):
                    continue
                tensor = _read(f, key, file)
                if tensor.dtype in _FP8:
                    tensor = _dequantize(f, key, tensor, file, key_to_file, block, load_device)
                elif not tensor.is_floating_point():
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has dtype {tensor.dtype}; weights must be "
                        "floating point (fp32/bf16/fp16, or FP8 with weight_scale_inv)"
                    )
                for ours, t in hf_to_ours(key, tensor):
                    ours = MTP_PREFIX + ours if in_mtp else ours
                    if ours not in expected:
                        unexpected.append(f"{ours} (in {file.name})")
                        continue
                    if ours in source:
                        raise CheckpointError(
                            f"tensor {ours!r} is in both {source[ours].name} and {file.name}; "
                            "remove the stale file or add a model.safetensors.index.json"
                        )
                    want = tuple(expected[ours].shape)
                    if tuple(t.shape) != want:
                        raise CheckpointError(
                            f"{file}: tensor {ours!r} has shape {tuple(t.shape)}, but this "
                            f"config needs {want}"
                        )
                    if not bool(torch.isfinite(t).all()):
                        raise CheckpointError(f"{file}: tensor {ours!r} contains NaN or Inf values")
                    target = torch.float32 if ours.endswith(FP32_KEYS) else dtype
                    loaded[ours] = t.to(target)
                    source[ours] = file
    if unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} unexpected tensor(s) for this config, e.g. "
            + ", ".join(unexpected[:5])
        )
    needed = set(expected) - ({"lm_head.weight"} if tied else set())
    missing = sorted(needed - set(loaded))
    if load_mtp and not any(k.startswith(MTP_PREFIX) for k in loaded):
        n = config.num_hidden_layers
        raise CheckpointError(
            f"{folder}: load_mtp=True and config.json sets num_nextn_predict_layers={mtp}, but "
            f"{', '.join(p.name for p in files)} hold no MTP tensors (model.layers.{n}.*); the "
            "checkpoint was saved without its MTP module, load it with load_mtp=False"
        )
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensor(s) missing from {', '.join(p.name for p in files)}, "
            f"e.g. " + ", ".join(missing[:5])
        )
    if tied and "lm_head.weight" in loaded:
        head = loaded.pop("lm_head.weight")
        if not torch.equal(head, loaded["model.embed_tokens.weight"]):
            raise CheckpointError(
                f"{source['lm_head.weight']}: config.json sets tie_word_embeddings=true but "
                "lm_head.weight differs from model.embed_tokens.weight; set it to false"
            )
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config, device=load_device)
    if load_mtp:
        model.mtp.rotary_emb = RotaryEmbedding(config, device=load_device)
    return model.to(device).eval()


def _read(f, key: str, file: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e})") from e


def _dequantize(f, key, tensor, file, key_to_file, block, device) -> torch.Tensor:
    scale_key = f"{key}_scale_inv"
    if scale_key in f.keys():
        scale = f.get_tensor(scale_key)
    elif scale_key in key_to_file:
        with _open(key_to_file[scale_key], device) as g:
            scale = _read(g, scale_key, key_to_file[scale_key])
    else:
        raise CheckpointError(f"{file}: FP8 tensor {key!r} has no {scale_key!r}")
    try:
        return dequantize_fp8(tensor, scale, block)
    except ValueError as e:
        raise CheckpointError(f"{file}: {key!r}: {e}") from e


def save_model(
    model: CausalLM,
    folder: str | Path,
    max_shard_size: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write ``config.json`` and safetensors in the HF Hub layout (loadable by transformers).

    Args:
        model: the model to save.
        folder: output folder (created).
        max_shard_size: bytes per shard; above it, shards plus ``model.safetensors.index.json``.
        dtype: cast floating tensors to this dtype (default: keep).

    Returns the written weight files. Each file is written to a temporary name and renamed.

    Raises:
        ValueError: ``max_shard_size`` is not a positive integer.
    """
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {}
    for k, v in state.items():
        k = k.removeprefix(MTP_PREFIX)  # a loaded MTP module: back to model.layers.{n}.*
        if dtype is not None and v.is_floating_point() and not k.endswith(FP32_KEYS):
            v = v.to(dtype)
        tensors[k] = v
    cfg = model.config.to_hf()
    # weights are written as they are in memory: an FP8 source was dequantized on load
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    return write_checkpoint(folder, tensors, cfg, max_shard_size)


def write_checkpoint(
    folder: str | Path, tensors: dict[str, torch.Tensor], config: dict, max_shard_size: int
) -> list[Path]:
    """Write ``tensors`` as safetensors (sharded above ``max_shard_size`` bytes, with an index)
    and ``config`` as ``config.json`` into ``folder``, each file atomically; shards left by an
    earlier save of another size are removed. Returns the weight files.

    Raises:
        ValueError: ``max_shard_size`` is not a positive integer.
    """
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    shards = _plan_shards(tensors.items(), max_shard_size)
    if len(shards) == 1:
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written, weight_map = [], {}
    for name, shard in zip(names, shards, strict=True):
        path = folder / name
        atomic_write(path, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
        written.append(path)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(
            folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    else:
        (folder / INDEX_NAME).unlink(missing_ok=True)
    for stale in folder.glob("model-*-of-*.safetensors"):  # shards of an earlier save
        if stale.name not in names:
            stale.unlink()
    write_json(folder / "config.json", config)
    return written


def _plan_shards(items: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for k, t in items:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards
