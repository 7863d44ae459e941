"""Extend a model's vocabulary with domain terms: new added tokens in ``tokenizer.json`` and new
rows in ``embed_tokens`` and ``lm_head`` (``deepwhale tokenizer extend``).

Each term becomes a ``tokenizers`` :class:`~tokenizers.AddedToken` with ``normalized=True``, so
it is matched in the *normalized* text like any other word:

* byte-level BPE (DeepSeek, GPT-2): a term that starts with a letter or digit is also added with
  a leading space (``" interest rate"``), the form it takes inside a sentence; without it the
  space before the term would become a token of its own. The bare form is ``single_word`` (no
  match inside a longer word such as ``"Xinterest rate"``); the spaced form cannot be (its left
  neighbour is the previous word), so ``" interest rates"`` becomes ``" interest rate"`` + ``s``
  (still decoded exactly).
* SentencePiece-style tokenizers whose normalizer prepends ``▁`` (Metaspace, stories260K): the
  term's content is normalized too (``"▁市盈率"``), so it matches at the start of a word, after a
  space or at the start of the text, and ``decode(encode(x)) == x`` stays exact. A term glued to
  the previous word without a space (``很高市盈率``) keeps its old sub-tokens there; adding it
  non-normalized instead would match it everywhere but make the text after it start a new
  ``▁`` word, so decoding would gain a space after the term.

Text that contains none of the terms encodes exactly as before: added tokens only split the
text where a term occurs, and every old id keeps its meaning.

The new rows (reference: Hewitt 2021, "Initializing new word embeddings for pretrained language
models"; the sub-token mean of e.g. Gee et al. 2022, "Fast Vocabulary Transfer"): the row of a
new token in ``embed_tokens`` is the mean of the rows of the sub-tokens the *old* tokenizer
splits the term into, and the same for ``lm_head`` when it is not tied. A term the old
tokenizer already encodes as one token is skipped. When the tokenizer has fewer ids than the
embedding has rows (DeepSeek-V3: 128,815 ids, 129,280 rows), new ids take the padding rows first
and ``vocab_size`` grows only past them.

Only the safetensors files holding ``model.embed_tokens.weight`` / ``lm_head.weight`` are read
and rewritten (atomically); the other files are copied.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deepwhale.atomic import atomic_write, write_json
from deepwhale.checkpoint.hub import CheckpointError

__all__ = ["ExtendResult", "extend_tokenizer", "extend_vocabulary"]

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_LATIN_START = re.compile(r"^[^\W_]", re.ASCII)
_PREPEND = "▁"


@dataclass(frozen=True)
class ExtendResult:
    """What :func:`extend_vocabulary` did.

    Attributes:
        out: the written folder.
        added: ``{token content: new id}`` in id order.
        skipped: terms the old tokenizer already encodes as one token.
        old_vocab_size, new_vocab_size: the embedding rows before and after.
        tied: ``lm_head`` shares ``embed_tokens``.
    """

    out: Path
    added: dict[str, int]
    skipped: list[str]
    old_vocab_size: int
    new_vocab_size: int
    tied: bool


def _normalizers(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [n for s in spec.get("normalizers", []) for n in _normalizers(s)]
    return [spec]


def _style(tokenizer_json: dict) -> str:
    """``byte_level``, ``prepend`` (a normalizer prepends ▁) or ``other``."""
    if "ByteLevel" in json.dumps(tokenizer_json.get("pre_tokenizer")):
        return "byte_level"
    if any(n.get("type") == "Prepend" for n in _normalizers(tokenizer_json.get("normalizer"))):
        return "prepend"
    return "other"


def extend_tokenizer(tokenizer, terms: list[str], style: str) -> tuple[dict, dict, list[str]]:
    """Add ``terms`` to a ``tokenizers.Tokenizer`` in place (see the module docstring).

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` (changed in place).
        terms: the surface forms to add, in order.
        style: ``byte_level``, ``prepend`` or ``other`` (how the tokenizer treats spaces).

    Returns:
        ``(added {content: id}, sub-tokens {content: old ids}, skipped terms)``; a term is
        skipped when it already is one token of the vocabulary or an added token.
    """
    from tokenizers import AddedToken

    plan: list[tuple[str, list[int], bool]] = []
    skipped = []
    for term in dict.fromkeys(t.strip() for t in terms if t.strip()):
        latin = bool(_LATIN_START.match(term))
        forms = [term, " " + term] if style == "byte_level" and latin else [term]
        # a form that already is one token (in the vocabulary or added) needs no new one
        single = [
            f
            for f in forms
            if tokenizer.token_to_id(f) is not None
            or len(tokenizer.encode(f, add_special_tokens=False).ids) == 1
        ]
        if term in single or forms == single:
            skipped.append(term)
            continue
        for f in forms:
            if f not in single:
                ids = tokenizer.encode(f, add_special_tokens=False).ids
                plan.append((f, ids, latin and style == "byte_level" and f == term))
    tokenizer.add_tokens([AddedToken(f, normalized=True, single_word=sw) for f, _, sw in plan])
    added = {f: tokenizer.token_to_id(f) for f, _, _ in plan}
    return added, {f: ids for f, ids, _ in plan}, skipped


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, Path], Path | None]:
    from deepwhale.checkpoint.io import checkpoint_files

    files, key_to_file = checkpoint_files(folder)
    index = folder / "model.safetensors.index.json"
    return files, key_to_file, index if index.exists() else None


def _grow(weight: torch.Tensor, rows: int, new_ids: dict, subs: dict) -> torch.Tensor:
    """``weight`` [V, H] grown to [rows, H]; row ``new_ids[f]`` = mean of ``weight[subs[f]]``
    (computed in fp32, cast back)."""
    if rows > weight.shape[0]:
        pad = torch.zeros(rows - weight.shape[0], weight.shape[1], dtype=weight.dtype)
        out = torch.cat([weight, pad])
    else:
        out = weight.clone()
    for f, i in new_ids.items():
        ids = [j for j in subs[f] if j < weight.shape[0]]
        if not ids:
            raise CheckpointError(
                f"term {f!r}: the old tokenizer gives no id below {weight.shape[0]}"
            )
        out[i] = weight[ids].float().mean(0).to(weight.dtype)
    return out


def extend_vocabulary(model_dir: str | Path, terms: list[str], out_dir: str | Path) -> ExtendResult:
    """Write a copy of the HF folder ``model_dir`` into ``out_dir`` with ``terms`` added to
    ``tokenizer.json`` and the embedding rows to match (see the module docstring).

    Args:
        model_dir: HF folder with ``config.json``, ``tokenizer.json`` and safetensors weights.
        terms: surface forms to add (e.g. ``Dictionary.tokens()``).
        out_dir: output folder (created; must not be ``model_dir``).

    Returns:
        An :class:`ExtendResult`.

    Raises:
        CheckpointError: a missing file, ``out_dir`` equal to ``model_dir``, no
            ``model.embed_tokens.weight``, or a config without ``vocab_size``.
    """
    from tokenizers import Tokenizer

    src, out = Path(model_dir), Path(out_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise CheckpointError(f"{src}: no {name}")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"--out must be a new folder, not the model folder {src}")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    text_cfg = config.get("text_config", config)
    if not isinstance(text_cfg.get("vocab_size"), int):
        raise CheckpointError(f"{src / 'config.json'}: no integer vocab_size")
    tied = bool(config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    files, key_to_file, index = _weight_files(src)
    if key_to_file:
        embed_file = key_to_file.get(EMBED)
        head_file = key_to_file.get(LM_HEAD)
    else:
        from safetensors import safe_open

        with safe_open(str(files[0]), "pt") as f:
            keys = set(f.keys())
        embed_file = files[0] if EMBED in keys else None
        head_file = files[0] if LM_HEAD in keys else None
    if embed_file is None:
        raise CheckpointError(f"{src}: no {EMBED} in the safetensors files")

    tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    added, subs, skipped = extend_tokenizer(tokenizer, terms, _style(tok_json))
    old_rows = int(text_cfg["vocab_size"])
    rows = max([old_rows, *(i + 1 for i in added.values())])

    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in ("tokenizer.json", "config.json") and p.suffix != ".tmp":
            shutil.copy2(p, out / p.name)
    total_delta = 0
    for file in dict.fromkeys(f for f in (embed_file, head_file) if f is not None):
        tensors = load_file(str(file))
        for key in (EMBED, LM_HEAD):
            if key in tensors:
                before = tensors[key].numel() * tensors[key].element_size()
                tensors[key] = _grow(tensors[key], rows, added, subs).contiguous()
                total_delta += tensors[key].numel() * tensors[key].element_size() - before
        atomic_write(
            out / file.name, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"})
        )
    if index is not None:
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = (
            int(data["metadata"].get("total_size", 0)) + total_delta
        )
        write_json(out / index.name, data)
    text_cfg["vocab_size"] = rows
    write_json(out / "config.json", config)
    atomic_write(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    _update_tokenizer_config(out, tokenizer, added)
    return ExtendResult(out, added, skipped, old_rows, rows, tied)


def _update_tokenizer_config(out: Path, tokenizer, added: dict[str, int]) -> None:
    """Add the new tokens to ``added_tokens_decoder`` of ``tokenizer_config.json`` when the file
    lists one (transformers reads it beside ``tokenizer.json``)."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" not in cfg:
        return
    decoder = tokenizer.get_added_tokens_decoder()
    for content, i in added.items():
        t = decoder[i]
        cfg["added_tokens_decoder"][str(i)] = {
            "content": content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
    write_json(path, cfg)
