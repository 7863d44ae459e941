"""LoRA adapters on deepwhale models, in PEFT's format (Hu et al. 2021, arXiv:2106.09685).

A frozen linear layer ``W`` gains a trainable low-rank update: ``y = W x + (alpha / r) B A x`` with
``A`` ``(r, in)`` and ``B`` ``(out, r)``, ``B`` initialised to zero. The adapters are PEFT's own
(``peft.get_peft_model``), and deepwhale's module names mirror transformers', so an adapter saved
here (``adapter_model.safetensors`` + ``adapter_config.json``, keys like
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) loads with
``peft.PeftModel.from_pretrained`` onto the transformers model of the same checkpoint and gives
the same logits, and the other way round.

For MLA + MoE models (deepseek_v2/v3) the default targets are the attention projections only:
transformers 5 fuses the routed experts into 3-D parameters, and PEFT rewrites MLP targets for
such models, so MLP adapters would not map one to one.

    from deepwhale.lora import apply_lora
    model = apply_lora(model, r=16, lora_alpha=32)        # prints the trainable share
    ...train...
    save_adapter(model, "adapter/")
    merged = merge_lora(model)                            # a plain CausalLM again
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepwhale.model.transformer import CausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_MLP = {"gate_proj", "up_proj", "down_proj"}
_EXPERTS = r".*\.experts\.\d+\..*"
MLA_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


class LoraError(ValueError):
    """A LoRA request that cannot be met: unknown target modules, a missing or unreadable adapter
    folder, an adapter made for another model."""


#: loggers that print noise on every ``import peft`` (torchao's optional CUDA kernels, pytree
#: deprecation notes); quietened to ERROR while peft imports
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_peft_import():
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _peft():
    """The ``peft`` module, imported without torchao's "Failed to load ... .so" lines."""
    with _quiet_peft_import():
        import peft

    return peft


def default_target_modules(config) -> list[str]:
    """Module names to adapt by default.

    llama / qwen2: every attention and MLP projection. deepseek_v2 / v3: the MLA projections
    (``q_proj`` or ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``);
    see the module docstring for why not the MoE MLPs.
    """
    if config.is_mla:
        names = MLA_TARGETS
        if config.q_lora_rank:
            names = [n for n in names if n != "q_proj"]
        else:
            names = [n for n in names if n not in ("q_a_proj", "q_b_proj")]
        return list(names)
    return list(LLAMA_TARGETS)


def _unwrap(model: Any) -> tuple[Any, nn.Module]:
    """``(holder, module)``: a DeepSeekModel-like object holds its network in ``.module``."""
    if isinstance(model, nn.Module):
        return None, model
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        return model, module
    raise TypeError(f"expected a deepwhale CausalLM or DeepSeekModel, got {type(model).__name__}")


def trainable_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (tied weights counted once)."""
    _, module = _unwrap(model)
    seen, trainable, total = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def apply_lora(
    model: Any,
    r: int = 16,
    lora_alpha: float = 32,
    target_modules: list[str] | None = None,
    lora_dropout: float = 0.0,
    verbose: bool = True,
) -> Any:
    """Freeze ``model`` and add LoRA adapters with PEFT.

    Args:
        model: a :class:`~deepwhale.model.transformer.CausalLM` or a
            :class:`~deepwhale.api.DeepSeekModel` (its ``module`` is wrapped in place).
        r: adapter rank.
        lora_alpha: scaling numerator (the update is scaled by ``lora_alpha / r``).
        target_modules: module names (last path component) to adapt; default
            :func:`default_target_modules`.
        lora_dropout: dropout on the adapter input during training.
        verbose: print the trainable-parameter share.

    Returns:
        For a CausalLM, the ``peft.PeftModel`` wrapping it (call it like the model); for a
        DeepSeekModel, the same DeepSeekModel whose ``module`` is now the PeftModel.

    Raises:
        LoraError: a target name that matches no linear layer (the message lists the names the
            model has), or ``r`` < 1.
        TypeError: ``model`` is neither kind.
    """
    peft = _peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    holder, module = _unwrap(model)
    base = getattr(module, "base_model", None)
    if base is not None and hasattr(module, "peft_config"):
        raise LoraError("the model already has LoRA adapters; merge or unload them first")
    if not isinstance(r, int) or r < 1:
        raise LoraError(f"r must be a positive integer, got {r!r}")
    config = module.config
    targets = list(target_modules) if target_modules else default_target_modules(config)
    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    )
    missing = [t for t in targets if t not in linear]
    if missing or not targets:
        raise LoraError(
            f"target module(s) {', '.join(missing) or '(none)'} not found; this model's linear "
            f"layers are named: {', '.join(linear)}"
        )
    lcfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        # routed experts are fused parameters in transformers; keep adapters off them
        exclude_modules=_EXPERTS if config.n_routed_experts and set(targets) & _MLP else None,
        bias="none",
    )
    peft_model = get_peft_model(module, lcfg)
    if holder is not None and getattr(holder, "path", None) is not None:
        peft_model.peft_config["default"].base_model_name_or_path = str(holder.path)
    if verbose:
        trainable, total = trainable_parameters(peft_model)
        print(
            f"LoRA r={r} alpha={lora_alpha} on {', '.join(targets)}: trainable params "
            f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        )
    if holder is not None:
        holder.module = peft_model
        holder._engine = None  # rebuilt around the wrapped module on next use
        return holder
    return peft_model


def save_adapter(model: Any, folder: str | Path, base_model: str | Path | None = None) -> Path:
    """Write the adapter in PEFT's format (``adapter_model.safetensors`` +
    ``adapter_config.json``) to ``folder``; returns the folder.

    Args:
        model: the LoRA-wrapped model.
        folder: output folder (replaced atomically).
        base_model: the base checkpoint folder, recorded as ``base_model_name_or_path`` in
            ``adapter_config.json`` (absolute path); default: what :func:`apply_lora` recorded.

    Raises:
        LoraError: the model has no LoRA adapters.
    """
    _, module = _unwrap(model)
    if not hasattr(module, "peft_config"):
        raise LoraError("the model has no LoRA adapters; call apply_lora first")
    if base_model is not None:
        module.peft_config["default"].base_model_name_or_path = str(Path(base_model).resolve())
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # no embedding adapters here; also skips PEFT's vocab check, which needs a transformers config
    module.save_pretrained(str(tmp), save_embedding_layers=False)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight$")


def _read_adapter(folder: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """``(adapter_config, {tensor key: shape})`` of an adapter folder, read without loading the
    tensors.

    Raises:
        LoraError: a missing, malformed or truncated file (the message names it).
    """
    from safetensors import safe_open

    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise LoraError(f"{folder}: no adapter_config.json; is this a LoRA adapter folder?")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoraError(f"{cfg_path}: malformed adapter config ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{cfg_path}: malformed adapter config (expected a JSON object)")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        raise LoraError(f"{folder}: no adapter_model.safetensors")
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # SafetensorError and friends: truncated or not safetensors
        raise LoraError(f"{weights}: unreadable safetensors file ({e})") from None
    return config, shapes


def check_adapter_matches(module: nn.Module, folder: Path) -> None:
    """Check that every tensor of the adapter in ``folder`` lands on a linear layer of
    ``module`` with the right shape (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``), and that
    every layer the adapter config targets has its tensors; PEFT would silently skip or
    zero-initialise the rest (an adapter trained on another model would be half-merged).

    Raises:
        LoraError: keys that do not match (the message counts them and lists a few), or an
            unreadable adapter folder.
    """
    config, shapes = _read_adapter(folder)
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    bad: list[str] = []
    adapted: set[str] = set()
    for key, shape in sorted(shapes.items()):
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # modules_to_save / embedding adapters: left to PEFT
        name, which = m.groups()
        layer = linears.get(name)
        if layer is None:
            bad.append(f"{key} (no linear layer {name})")
            continue
        adapted.add(name)
        want = (layer.in_features,) if which == "A" else (layer.out_features,)
        got = shape[1:] if which == "A" else shape[:1]
        if len(shape) != 2 or tuple(got) != want:
            dims = f"(r, {layer.in_features})" if which == "A" else f"({layer.out_features}, r)"
            bad.append(f"{key} (shape {list(shape)}, the model needs {dims})")
    targets = config.get("target_modules")
    exclude = config.get("exclude_modules")
    if isinstance(targets, list | set):
        for name in sorted(linears):
            if name.rsplit(".", 1)[-1] not in targets or name in adapted:
                continue
            if isinstance(exclude, str) and re.fullmatch(exclude, name):
                continue
            if isinstance(exclude, list | set) and name.rsplit(".", 1)[-1] in exclude:
                continue
            bad.append(f"{name} (targeted, but the adapter has no tensors for it)")
    if bad:
        base = config.get("base_model_name_or_path")
        made_for = f" (made for {base})" if base else ""
        raise LoraError(
            f"{folder}: the adapter{made_for} does not fit this model: {len(bad)} key(s) do not "
            f"match, e.g. {'; '.join(bad[:3])}"
        )


def load_adapter(model: Any, folder: str | Path, is_trainable: bool = False) -> Any:
    """Wrap ``model`` (CausalLM or DeepSeekModel) with the PEFT adapter saved in ``folder``.

    Raises:
        LoraError: ``folder`` has no ``adapter_config.json``; a malformed config or truncated
            ``adapter_model.safetensors`` (the file is named); or an adapter that does not fit
            the model (see :func:`check_adapter_matches`).
    """
    folder = Path(folder)
    holder, module = _unwrap(model)
    check_adapter_matches(module, folder)
    PeftModel = _peft().PeftModel
    peft_model = PeftModel.from_pretrained(module, str(folder), is_trainable=is_trainable)
    if holder is not None:
        holder.module = peft_model
        holder._engine = None
        return holder
    return peft_model


def merge_lora(model: Any) -> Any:
    """Fold the adapters into the base weights (``W += (alpha / r) B A``) and drop PEFT.

    Returns the plain :class:`CausalLM` (or the DeepSeekModel holding it). Logits match the
    unmerged model to float rounding (tested within 1e-5 in fp32).

    Raises:
        LoraError: the model has no LoRA adapters.
    """
    holder, module = _unwrap(model)
    if not hasattr(module, "merge_and_unload"):
        raise LoraError("the model has no LoRA adapters to merge")
    merged = module.merge_and_unload()
    if holder is not None:
        holder.module = merged
        holder._engine = None
        return holder
    return merged


def merge_adapter_folder(
    model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path
) -> Path:
    """Load a checkpoint folder and an adapter, merge, and write an HF folder to ``out_dir``
    (config, safetensors in the checkpoint's dtype, tokenizer files copied).

    Raises:
        LoraError: a missing or unreadable adapter folder, or an adapter made for another model
            (see :func:`load_adapter`).
        CheckpointError / ConfigError: a bad model folder.
    """
    from deepwhale.checkpoint.io import load_model, save_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    base: CausalLM = load_model(model_dir, dtype=torch.float32)
    merged = merge_lora(load_adapter(base, adapter_dir))
    saved = base.config.torch_dtype
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(saved or "", None)
    save_model(merged, out_dir, dtype=dtype)
    copy_tokenizer_files(model_dir, out_dir)
    return out_dir


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy ``tokenizer.json``, its config, special tokens and generation config if present."""
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        if (Path(src) / name).exists() and Path(src).resolve() != Path(dst).resolve():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
