"""Export a LLaMA-layout checkpoint folder to GGUF (llama.cpp's format) with the ``gguf`` package.

Covers ``model_type: llama`` (DeepSeek LLM/Coder, R1-Distill-Llama, the bundled stories260K) in
F32 or F16. Tensor names and metadata keys follow the GGUF spec of ggml's ``gguf-py``
(``token_embd``, ``blk.{i}.attn_q``..., ``llama.rope.freq_base``...). llama.cpp applies RoPE to
adjacent pairs, so q/k rows are permuted back from the HF rotate-half layout, the inverse of the
permutation HF's LLaMA conversion applies.

Tokenizer: a SentencePiece-style ``tokenizer.json`` (BPE with byte fallback) is written as
``tokenizer.ggml.model = "llama"`` with one score per token (merge priority); a folder without a
tokenizer gets placeholder tokens, which is enough to benchmark llama.cpp on random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.io import load_model

_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order -> adjacent-pair row order, per head.

    Args:
        w: ``(n_heads * head_dim, in)`` q or k projection in HF layout.
        n_heads: heads of that projection (``num_key_value_heads`` for k).

    Returns ``(n_heads * head_dim, in)`` with rows ``[0, d/2, 1, d/2 + 1, ...]`` of each head.
    """
    out, inp = w.shape
    d = out // n_heads
    return w.view(n_heads, 2, d // 2, inp).transpose(1, 2).reshape(out, inp)


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int], dict]:
    """Tokens, scores, token types (1 normal, 2 unknown, 3 control, 6 byte) and special ids."""
    path = folder / "tokenizer.json"
    if not path.exists():
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        tokens += [f"tok{i}" for i in range(len(tokens), vocab_size)]
        types = [2, 3, 3] + [6] * 256 + [1] * (vocab_size - 259)
        return tokens[:vocab_size], [0.0] * vocab_size, types[:vocab_size], {"bos": 1, "eos": 2}
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise CheckpointError(
            f"{path}: GGUF export supports SentencePiece-style BPE tokenizers with byte fallback "
            "(LLaMA / stories260K); this one is not"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * vocab_size
    for tok, i in vocab.items():
        if i < vocab_size:
            tokens[i] = tok
    merged = {}
    for rank, merge in enumerate(model.get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged.setdefault(a + b, -float(rank))
    specials = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    scores, types = [], []
    for i, tok in enumerate(tokens):
        scores.append(merged.get(tok, 0.0))
        if tok == model.get("unk_token"):
            types.append(2)
        elif i in specials:
            types.append(3)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    cfg = folder / "tokenizer_config.json"
    special_ids = {"bos": 1, "eos": 2}
    if cfg.exists():
        tc = json.loads(cfg.read_text(encoding="utf-8"))
        for key in ("bos", "eos"):
            tok = tc.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok in vocab:
                special_ids[key] = vocab[tok]
    return tokens, scores, types, special_ids


def export_gguf(folder: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write ``folder`` (HF LLaMA layout) as a GGUF file at ``out``; returns ``out``.

    Args:
        folder: checkpoint folder with config.json, safetensors and (optionally) tokenizer.json.
        out: the ``.gguf`` path (written to a temporary name, then renamed).
        dtype: ``"f32"`` or ``"f16"`` for the matrices (norms stay F32, as llama.cpp expects).

    Raises:
        CheckpointError: a model type other than llama, or an unsupported tokenizer.
        ImportError: the ``gguf`` package is missing (``pip install gguf``).
        ValueError: an unknown dtype.
    """
    import gguf

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    folder, out = Path(folder), Path(out)
    model = load_model(folder)
    c = model.config
    if c.model_type != "llama" or c.rope_type != "default" or c.qkv_bias or c.mlp_bias:
        raise CheckpointError(
            f"{folder}: GGUF export covers the plain LLaMA layout (model_type llama, default RoPE, "
            f"no biases); this is {c.model_type} with rope {c.rope_type}"
        )
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(folder.name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types, special = _vocab(folder, c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    w.add_add_bos_token(True)
    mat = np.float32 if dtype == "f32" else np.float16
    state = model.state_dict()

    def put(name: str, t: torch.Tensor, matrix: bool = True) -> None:
        arr = t.detach().float().numpy()
        w.add_tensor(name, arr.astype(mat if matrix and arr.ndim == 2 else np.float32))

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"], matrix=False)
    if not c.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for ours, theirs in _NAMES.items():
            t = state[f"model.layers.{i}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                t = to_interleaved(t, c.num_attention_heads)
            elif ours == "self_attn.k_proj":
                t = to_interleaved(t, c.num_key_value_heads)
            put(f"blk.{i}.{theirs}.weight", t, matrix=t.dim() == 2)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
