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
    """A LoRA request that cannot be met: unknown target modules, a missing adapter folder."""


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
    from peft import LoraConfig, get_peft_model

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


def save_adapter(model: Any, folder: str | Path) -> Path:
    """Write the adapter in PEFT's format (``adapter_model.safetensors`` +
    ``adapter_config.json``) to ``folder``; returns the folder.

    Raises:
        LoraError: the model has no LoRA adapters.
    """
    _, module = _unwrap(model)
    if not hasattr(module, "peft_config"):
        raise LoraError("the model has no LoRA adapters; call apply_lora first")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # no embedding adapters here; also skips PEFT's vocab check, which needs a transformers config
    module.save_pretrained(str(tmp), save_embedding_layers=False)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_adapter(model: Any, folder: str | Path, is_trainable: bool = False) -> Any:
    """Wrap ``model`` (CausalLM or DeepSeekModel) with the PEFT adapter saved in ``folder``.

    Raises:
        LoraError: ``folder`` has no ``adapter_config.json``.
    """
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise LoraError(f"{folder}: no adapter_config.json; is this a LoRA adapter folder?")
    holder, module = _unwrap(model)
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
        LoraError: a missing adapter folder.
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
