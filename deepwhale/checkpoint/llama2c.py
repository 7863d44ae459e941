"""Convert a Karpathy llama2.c checkpoint (legacy ``.bin``) into a Hugging Face LLaMA folder.

The input is the *legacy* (version-0) export of `llama2.c <https://github.com/karpathy/llama2.c>`_
(``export.py`` ``legacy_export`` / what ``run.c`` reads), as shipped with the ``tinyllamas``
checkpoints (``stories260K.bin``, ``stories15M.bin``, ...), plus the matching tokenizer either in
llama2.c's ``tokenizer.bin`` format (``tok512.bin``) or as the SentencePiece model it was
exported from (``tok512.model``).

The output is a folder that ``transformers.LlamaForCausalLM.from_pretrained`` and
``tokenizers.Tokenizer.from_file`` load without any custom code:

``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32, HF key names),
``tokenizer.json``, ``tokenizer_config.json`` and a ``README.md`` with provenance.

The tokenizer half (``tokenizer.bin`` / SentencePiece parsing and the HF tokenizer build) lives in
:mod:`deepwhale.checkpoint.llama2c_tokenizer`; its public names are re-exported here.

Command line::

    python -m deepwhale.checkpoint.llama2c stories260K.bin tok512.bin out_dir/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepwhale.checkpoint.llama2c_tokenizer import (
    Llama2cTokenizer,
    build_tokenizer,
    read_llama2c_tokenizer,
    tokenizer_config,
)

__all__ = [
    "Llama2cConfig",
    "Llama2cTokenizer",
    "convert_llama2c",
    "read_llama2c_checkpoint",
    "read_llama2c_tokenizer",
    "interleaved_to_half_rotary",
    "build_tokenizer",
    "hf_config",
    "hf_state_dict",
    "main",
]

_HEADER = struct.Struct("<7i")
_FLOAT32 = 4
#: First int32 of the newer (version >= 1) llama2.c exports: b"ak42" read as little-endian int32.
_LLAMA2C_MAGIC = 0x616B3432
#: Upper bound on header entries, to reject garbage headers before any arithmetic.
_MAX_HEADER_VALUE = 1 << 24

#: Values llama2.c hard-codes in ``model.py`` / ``run.c`` (not stored in the legacy file).
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0

# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama2cConfig:
    """The 7-int32 header of a legacy llama2.c checkpoint (``Config`` in ``run.c``).

    ``vocab_size`` is stored here as its absolute value; ``shared_classifier`` records the sign
    it had in the file (positive = the classifier is the token embedding table).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        """Per-head width ``dim // n_heads``."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: ``n_kv_heads * head_size``."""
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the fp32 blocks in file order (``run.c`` ``memory_map_weights``).

        Matrices are PyTorch ``nn.Linear`` weights, i.e. ``(out_features, in_features)``,
        row-major, stacked over layers. ``freq_cis_real`` / ``freq_cis_imag`` are the RoPE
        cos/sin tables, ``(seq_len, head_size // 2)``; ``run.c`` skips them. ``wcls`` is only
        present when the classifier is not shared.
        """
        d, h, n_l, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        shapes = [
            ("token_embedding_table", (v, d)),
            ("rms_att_weight", (n_l, d)),
            ("wq", (n_l, self.n_heads * self.head_size, d)),
            ("wk", (n_l, self.kv_dim, d)),
            ("wv", (n_l, self.kv_dim, d)),
            ("wo", (n_l, d, self.n_heads * self.head_size)),
            ("rms_ffn_weight", (n_l, d)),
            ("w1", (n_l, h, d)),
            ("w2", (n_l, d, h)),
            ("w3", (n_l, h, d)),
            ("rms_final_weight", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (v, d)))
        return shapes

    def expected_file_size(self) -> int:
        """Exact size in bytes of a legacy file with this header (28-byte header + fp32 data)."""
        n_floats = sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())
        return _HEADER.size + _FLOAT32 * n_floats


def _parse_header(path: Path, raw: bytes) -> Llama2cConfig:
    if len(raw) < _HEADER.size:
        raise ValueError(
            f"{path}: not a llama2.c checkpoint: expected at least {_HEADER.size} bytes "
            f"(7 x int32 header), got {len(raw)} bytes"
        )
    values = _HEADER.unpack_from(raw, 0)
    if values[0] == _LLAMA2C_MAGIC:
        raise ValueError(
            f"{path}: this is a versioned llama2.c export (magic 'ak42'); only the legacy "
            "version-0 format (export.py --version 0 / legacy_export) is supported"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for name, value in zip(names, values, strict=True):
        if not 0 < abs(value) <= _MAX_HEADER_VALUE or (name != "vocab_size" and value < 0):
            raise ValueError(f"{path}: invalid llama2.c header: {name}={value} (header {values})")
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise ValueError(
            f"{path}: invalid llama2.c header {values}: need dim % n_heads == 0, an even "
            "head size and n_heads % n_kv_heads == 0"
        )
    return Llama2cConfig(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )


def read_llama2c_checkpoint(path: Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """Read a legacy (version-0) llama2.c checkpoint.

    Follows the layout written by llama2.c ``export.py`` (``legacy_export``) and read by
    ``run.c`` (``read_checkpoint`` / ``memory_map_weights``): a header of 7 little-endian int32
    ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a positive
    ``vocab_size`` means the classifier shares the token embedding, a negative one that a
    separate ``wcls`` follows), then raw little-endian float32 blocks in the order and shapes
    given by :meth:`Llama2cConfig.tensor_shapes`.

    Args:
        path: the ``.bin`` file.

    Returns:
        ``(config, tensors)``; ``tensors`` maps the llama2.c block names to float32 arrays of
        the shapes in :meth:`Llama2cConfig.tensor_shapes` (matrices ``(out, in)``, in the
        llama2.c interleaved-RoPE row order for ``wq`` / ``wk``).

    Raises:
        ValueError: the file is shorter than a header, carries the versioned-export magic, has
            an inconsistent header, its size differs from the size the header implies (the
            message names the file and gives expected and actual byte counts), or holds
            non-finite weights.
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes()
    cfg = _parse_header(path, raw)
    expected = cfg.expected_file_size()
    if len(raw) != expected:
        raise ValueError(
            f"{path}: size mismatch for a legacy llama2.c checkpoint with header "
            f"dim={cfg.dim} hidden_dim={cfg.hidden_dim} n_layers={cfg.n_layers} "
            f"n_heads={cfg.n_heads} n_kv_heads={cfg.n_kv_heads} vocab_size={cfg.vocab_size} "
            f"seq_len={cfg.seq_len} shared_classifier={cfg.shared_classifier}: expected "
            f"{expected} bytes, got {len(raw)} bytes"
            + (" (truncated)" if len(raw) < expected else "")
        )
    data = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size)
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in cfg.tensor_shapes():
        n = int(np.prod(shape))
        block = data[offset : offset + n].reshape(shape).astype(np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"{path}: tensor {name!r} contains NaN or Inf values")
        tensors[name] = block
        offset += n
    return cfg, tensors


def interleaved_to_half_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a Q or K projection from interleaved to rotate-half RoPE.

    llama2.c (``run.c``, like Meta's original LLaMA code) rotates *adjacent* pairs of each
    head's vector: rows ``(2i, 2i+1)`` of a head form the i-th complex number, rotated by
    ``pos * theta**(-2i/head_size)``. Hugging Face ``LlamaAttention`` uses ``rotate_half``:
    it pairs row ``i`` with row ``i + head_size/2`` and gives that pair the same frequency
    ``theta**(-2i/head_size)``. So within every head the new row ``i`` must be old row ``2i``
    (the "real" parts) and new row ``i + head_size/2`` old row ``2i+1`` (the "imaginary"
    parts): ``perm = [0, 2, 4, ..., head_size-2, 1, 3, ..., head_size-1]``. Applying the same
    per-head permutation to q and k leaves every attention score ``q . k`` unchanged, so V and
    O need no change. This is the reordering HF's ``convert_llama_weights_to_hf`` applies to
    Meta checkpoints (its ``permute`` helper); it is re-derived here, not copied.

    Args:
        w: ``(n_heads * head_size, in_features)`` weight (``wq`` with ``n_heads``, or ``wk``
            with ``n_kv_heads``), any float dtype.
        n_heads: number of heads the rows are split into.

    Returns:
        A new C-contiguous array of the same shape and dtype with rows permuted per head.

    Raises:
        ValueError: ``w`` is not 2-D or its rows do not split into ``n_heads`` even-sized heads.
    """
    if w.ndim != 2 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(
            f"cannot split a weight of shape {w.shape} into {n_heads} heads of even size"
        )
    out_features, in_features = w.shape
    head_size = out_features // n_heads
    # (heads, pairs, 2, in) -> (heads, 2, pairs, in): first all pair[0] rows, then all pair[1].
    w = w.reshape(n_heads, head_size // 2, 2, in_features).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(w.reshape(out_features, in_features))


def hf_state_dict(cfg: Llama2cConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map llama2.c blocks to Hugging Face ``LlamaForCausalLM`` parameter names.

    ``w1`` -> ``gate_proj``, ``w3`` -> ``up_proj``, ``w2`` -> ``down_proj``; ``wq`` / ``wk``
    rows are reordered with :func:`interleaved_to_half_rotary`; the RoPE tables are dropped
    (HF recomputes them from ``rope_theta``); ``lm_head.weight`` is written only for an
    unshared classifier (``tie_word_embeddings`` covers the shared case).

    Args:
        cfg: the checkpoint header.
        tensors: output of :func:`read_llama2c_checkpoint`.

    Returns:
        ``{hf_name: float32 C-contiguous array}`` with HF shapes (``(out, in)`` matrices).
    """
    sd: dict[str, np.ndarray] = {"model.embed_tokens.weight": tensors["token_embedding_table"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensors["rms_att_weight"][i]
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_half_rotary(
            tensors["wq"][i], cfg.n_heads
        )
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_half_rotary(
            tensors["wk"][i], cfg.n_kv_heads
        )
        sd[p + "self_attn.v_proj.weight"] = tensors["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = tensors["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = tensors["rms_ffn_weight"][i]
        sd[p + "mlp.gate_proj.weight"] = tensors["w1"][i]
        sd[p + "mlp.up_proj.weight"] = tensors["w3"][i]
        sd[p + "mlp.down_proj.weight"] = tensors["w2"][i]
    sd["model.norm.weight"] = tensors["rms_final_weight"]
    if not cfg.shared_classifier:
        sd["lm_head.weight"] = tensors["wcls"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def hf_config(cfg: Llama2cConfig) -> dict:
    """The ``config.json`` dict of the converted model (values llama2.c hard-codes included).

    Args:
        cfg: the checkpoint header.

    Returns:
        A JSON-serialisable dict for ``transformers.LlamaConfig``.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "hidden_size": cfg.dim,
        "initializer_range": 0.02,
        "intermediate_size": cfg.hidden_dim,
        "max_position_embeddings": cfg.seq_len,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.n_kv_heads,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_scaling": None,
        "rope_theta": ROPE_THETA,
        "tie_word_embeddings": cfg.shared_classifier,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _readme(cfg: Llama2cConfig, checkpoint: Path, tokenizer: Path, n_params: int) -> str:
    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    tied = "shared with the token embedding" if cfg.shared_classifier else "separate"
    return f"""# {checkpoint.stem} (llama2.c, converted to Hugging Face LLaMA format)

A tiny Llama-2-architecture language model trained on TinyStories by **Andrej Karpathy**, from
[llama2.c](https://github.com/karpathy/llama2.c) (`doc/stories260K.md`), published in
[karpathy/tinyllamas](https://huggingface.co/karpathy/tinyllamas). Licence: **MIT** (the
llama2.c and tinyllamas licence; keep this notice when redistributing). This folder is a
format conversion only; the weights and vocabulary are unchanged.

| | |
|---|---|
| dim / hidden_dim | {cfg.dim} / {cfg.hidden_dim} |
| layers / heads / kv heads | {cfg.n_layers} / {cfg.n_heads} / {cfg.n_kv_heads} |
| vocab / context | {cfg.vocab_size} / {cfg.seq_len} |
| parameters | {n_params:,} (fp32), classifier {tied} |

## Source files

| file | sha256 |
|---|---|
| `{checkpoint.name}` | `{sha(checkpoint)}` |
| `{tokenizer.name}` | `{sha(tokenizer)}` |

## How it was converted

`deepwhale.checkpoint.llama2c.convert_llama2c` (`python -m deepwhale.checkpoint.llama2c
{checkpoint.name} {tokenizer.name} OUT_DIR`):

* `model.safetensors`: the legacy llama2.c `.bin` (7 x int32 header, then fp32 blocks, as
  written by llama2.c `export.py` and read by `run.c`) mapped to HF names (w1 -> gate_proj,
  w3 -> up_proj, w2 -> down_proj). The rows of every q_proj (per head) and k_proj (per kv
  head) are reordered from llama2.c's interleaved RoPE pairs (2i, 2i+1) to HF's rotate-half
  pairs (i, i + head_size/2): new row order `[0, 2, 4, ..., 1, 3, 5, ...]` within a head.
  The stored RoPE tables are dropped (`rope_theta` 10000, as `run.c` uses).
* `config.json`: `rms_norm_eps` 1e-5 and `rope_theta` 10000 (llama2.c's fixed values).
* `tokenizer.json`: a `tokenizers` BPE model (byte fallback) built from the pieces and scores;
  the merges list every split of each piece, ordered by the merged piece's score, which
  reproduces SentencePiece's BPE. As in SentencePiece with this model's normalizer,
  leading/trailing spaces are removed, runs of spaces collapse to one, and "▁" is prepended.
  `<s>` / `</s>` are BOS / EOS (ids 1 / 2; `tokenizer.bin` spells them `"\\n<s>\\n"`).

Check: `LlamaForCausalLM` logits match a NumPy re-implementation of `run.c` on the `.bin`
(max abs diff < 1e-4), and greedy decoding from BOS gives "Once upon a time, there was a
little girl named Lily. ...", llama2.c's published temperature-0 sample.
"""


def convert_llama2c(checkpoint: Path, tokenizer: Path, out_dir: Path) -> Path:
    """Convert a legacy llama2.c checkpoint + tokenizer into a Hugging Face LLaMA folder.

    Reads the checkpoint with :func:`read_llama2c_checkpoint` (llama2.c ``export.py``
    ``legacy_export`` / ``run.c`` layout) and the tokenizer with
    :func:`read_llama2c_tokenizer` (``tokenizer.bin`` or SentencePiece ``.model``), then
    writes into ``out_dir`` (created if needed; each file written atomically via a temp file
    in ``out_dir`` and ``os.replace``; other files there are left alone):

    * ``config.json``: ``LlamaForCausalLM`` config (hidden_size=dim,
      intermediate_size=hidden_dim, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
      rope_theta=10000, tie_word_embeddings when the classifier is shared, bos/eos 1/2, fp32);
    * ``model.safetensors``: fp32 tensors under HF names, ``(out, in)`` matrices, q/k rows
      permuted from interleaved to rotate-half RoPE (:func:`interleaved_to_half_rotary`, the
      reordering HF ``convert_llama_weights_to_hf`` applies); ``lm_head.weight`` only if untied;
    * ``tokenizer.json`` (:func:`build_tokenizer`), ``tokenizer_config.json``
      (``PreTrainedTokenizerFast``, add BOS, not EOS, ``model_max_length`` = seq_len),
      ``generation_config.json`` (bos/eos ids) and a provenance ``README.md``.

    Args:
        checkpoint: legacy llama2.c ``.bin`` (e.g. ``stories260K.bin``).
        tokenizer: matching ``tokenizer.bin`` (e.g. ``tok512.bin``) or ``.model``.
        out_dir: output folder.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: a wrong-size / truncated / malformed checkpoint (the message names the file
            and the expected vs actual byte count) or a malformed or mismatched tokenizer.
        OSError: a file cannot be read or written.
    """
    from safetensors.numpy import save as save_safetensors

    checkpoint, tokenizer, out_dir = Path(checkpoint), Path(tokenizer), Path(out_dir)
    cfg, tensors = read_llama2c_checkpoint(checkpoint)
    tok = read_llama2c_tokenizer(tokenizer, cfg.vocab_size)
    state = hf_state_dict(cfg, tensors)
    hf_tok = build_tokenizer(tok)

    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = sum(v.size for v in state.values())
    files = {
        "config.json": _json_bytes(hf_config(cfg)),
        "generation_config.json": _json_bytes({"bos_token_id": 1, "eos_token_id": 2}),
        "model.safetensors": save_safetensors(state, metadata={"format": "pt"}),
        "tokenizer.json": (hf_tok.to_str(pretty=True) + "\n").encode(),
        "tokenizer_config.json": _json_bytes(tokenizer_config(cfg.seq_len)),
        "README.md": _readme(cfg, checkpoint, tokenizer, n_params).encode(),
    }
    for name, data in files.items():
        _atomic_write(out_dir / name, data)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m deepwhale.checkpoint.llama2c CKPT TOK OUT_DIR``.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status (0 on success).
    """
    parser = argparse.ArgumentParser(
        prog="python -m deepwhale.checkpoint.llama2c", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", type=Path, help="legacy llama2.c .bin checkpoint")
    parser.add_argument(
        "tokenizer", type=Path, help="llama2.c tokenizer.bin or SentencePiece .model"
    )
    parser.add_argument("out_dir", type=Path, help="output Hugging Face folder")
    args = parser.parse_args(argv)
    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
