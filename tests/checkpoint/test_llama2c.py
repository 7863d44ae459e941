"""Tests for deepwhale.checkpoint.llama2c (llama2.c stories260K -> Hugging Face LLaMA folder).

The reference model below re-implements llama2.c ``run.c``'s forward pass in NumPy straight from
the ``.bin`` file (its own parser, not the converter's), so the converted HF model is checked
against llama2.c's math, not against the converter's own reading of the file.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from deepwhale.checkpoint.llama2c import convert_llama2c, interleaved_to_half_rotary

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MODEL_DIR = SHARED / "models" / "stories260K"
CKPT = MODEL_DIR / "stories260K.bin"
TOK_BIN = MODEL_DIR / "tok512.bin"
TOK_MODEL = MODEL_DIR / "tok512.model"
ASSETS = Path(__file__).resolve().parents[2] / "deepwhale" / "assets" / "stories260K"

pytestmark = pytest.mark.skipif(
    not (CKPT.is_file() and TOK_BIN.is_file() and TOK_MODEL.is_file()),
    reason=f"shared test data not found at {MODEL_DIR} (clone the data repo as ../shared)",
)

LILY = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return convert_llama2c(CKPT, TOK_BIN, tmp_path_factory.mktemp("stories260K"))


# --------------------------------------------------------------------------------------------
# independent llama2.c reference (run.c semantics), float64 NumPy
# --------------------------------------------------------------------------------------------


def _load_llama2c(path: Path):
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw)
    shared, vocab, hs = vocab > 0, abs(vocab), dim // n_heads
    flat = np.frombuffer(raw, "<f4", offset=28).astype(np.float64)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        out = flat[pos : pos + n].reshape(shape)
        pos += n
        return out

    w = {
        "emb": take(vocab, dim),
        "rms_att": take(n_layers, dim),
        "wq": take(n_layers, n_heads * hs, dim),
        "wk": take(n_layers, n_kv * hs, dim),
        "wv": take(n_layers, n_kv * hs, dim),
        "wo": take(n_layers, dim, n_heads * hs),
        "rms_ffn": take(n_layers, dim),
        "w1": take(n_layers, hidden, dim),
        "w2": take(n_layers, dim, hidden),
        "w3": take(n_layers, hidden, dim),
        "rms_final": take(dim),
    }
    take(seq_len, hs // 2)  # freq_cis_real (run.c skips it)
    take(seq_len, hs // 2)  # freq_cis_imag
    w["cls"] = w["emb"] if shared else take(vocab, dim)
    assert pos == flat.size
    return {"n_layers": n_layers, "n_heads": n_heads, "n_kv": n_kv, "hs": hs}, w


def _reference_logits(cfg: dict, w: dict, tokens: list[int]) -> np.ndarray:
    """run.c forward for every position: (T,) token ids -> (T, vocab) logits."""
    n_heads, n_kv, hs, t = cfg["n_heads"], cfg["n_kv"], cfg["hs"], len(tokens)

    def rmsnorm(x, g):
        return g * (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5))

    # run.c: pair (2i, 2i+1) of each head rotates by pos * 10000^(-2i/head_size).
    angle = np.arange(t)[:, None] / 10000.0 ** (np.arange(0, hs, 2) / hs)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope(v):  # (T, heads, head_size)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    mask = np.triu(np.full((t, t), -np.inf), 1)
    x = w["emb"][tokens]
    for layer in range(cfg["n_layers"]):
        h = rmsnorm(x, w["rms_att"][layer])
        q = rope((h @ w["wq"][layer].T).reshape(t, n_heads, hs))
        k = rope((h @ w["wk"][layer].T).reshape(t, n_kv, hs))
        v = (h @ w["wv"][layer].T).reshape(t, n_kv, hs)
        # GQA as in run.c: query head h reads kv head h // (n_heads // n_kv).
        k, v = np.repeat(k, n_heads // n_kv, 1), np.repeat(v, n_heads // n_kv, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hs) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(t, -1) @ w["wo"][layer].T
        h = rmsnorm(x, w["rms_ffn"][layer])
        gate, up = h @ w["w1"][layer].T, h @ w["w3"][layer].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["cls"].T


@pytest.fixture(scope="module")
def reference():
    return _load_llama2c(CKPT)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


@functools.cache
def _texts() -> tuple[str, ...]:
    corpus = SHARED / "corpus"
    stories = (corpus / "en" / "tinystories" / "tinystories_sample.txt").read_text("utf-8")
    shakespeare = (corpus / "en" / "tinyshakespeare" / "input.txt").read_text("utf-8")
    texts = [s.strip() for s in stories.split("<|endoftext|>")]
    texts += stories.splitlines() + shakespeare.splitlines()[:8000]
    texts.append(shakespeare[:50_000])  # long multi-line input, one BPE "word"
    zh = corpus / "mixed" / "cmn-eng" / "cmn.txt"
    if zh.is_file():
        texts += zh.read_text("utf-8").splitlines()[:2000]
    texts += [
        "小明和小红去公园玩。",
        "床前明月光，疑是地上霜。",
        "Hello 世界! 🐳🦙 emoji 👩‍👩‍👧 and café, naïve, Ωμέγα.",
        "tabs\tand\nnewlines\r\n and  double  spaces   ",
        "  leading and trailing spaces  ",
        "digits 1234567890 and 3.14159",
        "",
        " ",
        "\u3000full-width space\u00a0nbsp\u200ahair",
    ]
    return tuple(texts)


def test_tokenizer_parity_with_sentencepiece(hf_dir):
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(TOK_MODEL))
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    texts = _texts()
    assert len(texts) > 10_000
    ours = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    theirs = sp.encode(list(texts))
    mismatches = [(t, a, b) for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    # The long inputs really exercise byte fallback (ids 3..258).
    assert any(3 <= i <= 258 for ids in ours for i in ids)

    assert tok.encode("Once upon a time", add_special_tokens=False).ids == [403, 407, 261, 378]
    assert tok.encode("Once upon a time").ids == [1, 403, 407, 261, 378]  # post-processor: BOS
    assert tok.decode_batch(ours) == sp.decode(ours)
    # Round trip is exact for text without SentencePiece's extra-whitespace normalization.
    for text in texts:
        if "  " not in text and text == text.strip(" "):
            assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.token_to_id("<unk>") == 0 and tok.get_vocab_size() == 512


def test_tokenizer_from_model_file_is_identical(hf_dir, tmp_path):
    pytest.importorskip("sentencepiece")
    out = convert_llama2c(CKPT, TOK_MODEL, tmp_path / "from_model")
    assert (out / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()


def test_transformers_autotokenizer(hf_dir):
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(TOK_MODEL))
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    # tokenizer_class PreTrainedTokenizerFast makes transformers use tokenizer.json as written,
    # so parity holds for every text, runs of spaces included.
    texts = list(_texts()[:3000])
    assert tok(texts, add_special_tokens=False).input_ids == sp.encode(texts)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def test_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 172, 5)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (512, 512)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert cfg["tie_word_embeddings"] is True and cfg["hidden_act"] == "silu"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tcfg["model_max_length"] == 512
    assert tcfg["add_bos_token"] is True and tcfg["add_eos_token"] is False
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    from safetensors.numpy import load_file

    sd = load_file(hf_dir / "model.safetensors")
    assert "lm_head.weight" not in sd and len(sd) == 2 + 9 * 5
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert sd["model.layers.4.mlp.down_proj.weight"].shape == (64, 172)


def test_rotary_permutation_equivalence():
    """Interleaved RoPE on W x equals rotate-half RoPE on (permuted W) x, up to the same row
    permutation, so q . k is preserved."""
    rng = np.random.default_rng(0)
    n_heads, hs, d_in, pos = 3, 8, 5, 7
    w = rng.standard_normal((n_heads * hs, d_in))
    x = rng.standard_normal(d_in)
    freqs = 10000.0 ** (-np.arange(0, hs, 2) / hs)
    cos, sin = np.cos(pos * freqs), np.sin(pos * freqs)

    v = (w @ x).reshape(n_heads, hs)  # llama2.c: rotate (2i, 2i+1)
    inter = np.empty_like(v)
    inter[:, 0::2] = v[:, 0::2] * cos - v[:, 1::2] * sin
    inter[:, 1::2] = v[:, 0::2] * sin + v[:, 1::2] * cos

    u = (interleaved_to_half_rotary(w, n_heads) @ x).reshape(n_heads, hs)  # HF rotate_half
    c2, s2 = np.concatenate([cos, cos]), np.concatenate([sin, sin])
    half = u * c2 + np.concatenate([-u[:, hs // 2 :], u[:, : hs // 2]], axis=1) * s2

    perm = [*range(0, hs, 2), *range(1, hs, 2)]
    np.testing.assert_allclose(half, inter[:, perm], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        interleaved_to_half_rotary(w, 5)


def test_logits_match_llama2c_reference(hf_model, reference):
    torch = pytest.importorskip("torch")
    cfg, w = reference
    # BOS + "Once upon a time, there was a little girl named Lily. She loved to play ..."
    prompt = [1, 403, 407, 261, 378, 430] + list(range(259, 300)) + [13, 13, 410, 475, 2, 0, 511]
    ref = _reference_logits(cfg, w, prompt)
    with torch.no_grad():
        ours = hf_model(torch.tensor([prompt])).logits[0].double().numpy()
    assert ours.shape == ref.shape == (len(prompt), 512)
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-4, f"max |logit diff| = {diff}"
    assert np.abs(ref).max() > 1.0  # not a degenerate comparison


def test_permutation_is_needed(hf_dir, reference, tmp_path):
    """Negative control: without the q/k row permutation the logits are far off."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "unpermuted"
    shutil.copytree(hf_dir, bad)
    sd = load_file(hf_dir / "model.safetensors")
    cfg, w = reference
    for i in range(cfg["n_layers"]):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = w["wq"][i].astype(np.float32)
        sd[f"model.layers.{i}.self_attn.k_proj.weight"] = w["wk"][i].astype(np.float32)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    model = transformers.LlamaForCausalLM.from_pretrained(bad, dtype=torch.float32).eval()
    prompt = [1, 403, 407, 261, 378, 430, 259, 260, 261, 262]
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].double().numpy()
    assert np.abs(ours - _reference_logits(cfg, w, prompt)).max() > 1e-2


def _greedy(hf_model, ids: list[int], n: int) -> list[int]:
    torch = pytest.importorskip("torch")
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0].tolist()


def test_greedy_text_matches_llama2c_sample(hf_model, hf_dir, reference):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = _greedy(hf_model, [1], 60)
    text = tok.decode(ids)  # skips BOS; Strip decoder drops the dummy-prefix space like run.c
    assert text.startswith(LILY + " "), text
    # Token-for-token the same as greedy decoding with the llama2.c reference.
    cfg, w = reference
    seq = [1]
    for _ in range(60):
        seq.append(int(_reference_logits(cfg, w, seq)[-1].argmax()))
    assert ids == seq

    prompt = tok.encode("Once upon a time").ids
    assert prompt == [1, 403, 407, 261, 378]
    cont = _greedy(hf_model, prompt, 40)
    assert cont[: len(prompt)] == prompt
    assert tok.decode(cont[len(prompt) :]).startswith(", there was a little girl named Lily.")
    assert tok.decode(cont).startswith(LILY)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_truncated_checkpoint(tmp_path):
    raw = CKPT.read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"truncated\.bin.*expected 1056540 bytes, got 1056440"):
        convert_llama2c(bad, TOK_BIN, tmp_path / "out")
    bad.write_bytes(raw + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"expected 1056540 bytes, got 1056544"):
        convert_llama2c(bad, TOK_BIN, tmp_path / "out")
    bad.write_bytes(raw[:10])
    with pytest.raises(ValueError, match="truncated.bin"):
        convert_llama2c(bad, TOK_BIN, tmp_path / "out")
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + raw[28:])
    with pytest.raises(ValueError, match="n_heads"):
        convert_llama2c(bad, TOK_BIN, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_tokenizer(tmp_path):
    raw = TOK_BIN.read_bytes()
    bad = tmp_path / "tok.bin"
    bad.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="tok.bin"):
        convert_llama2c(CKPT, bad, tmp_path / "out")
    bad.write_bytes(raw + b"x")
    with pytest.raises(ValueError, match="trailing"):
        convert_llama2c(CKPT, bad, tmp_path / "out")
    with pytest.raises(ValueError, match="stories260K.bin"):  # a checkpoint is no tokenizer
        convert_llama2c(CKPT, CKPT, tmp_path / "out")
    wrong = tmp_path / "tok512.model.bin"  # a SentencePiece protobuf read as tokenizer.bin
    wrong.write_bytes(TOK_MODEL.read_bytes())
    with pytest.raises(ValueError, match=r"tok512\.model\.bin"):
        convert_llama2c(CKPT, wrong, tmp_path / "out")
    garbage = tmp_path / "garbage.model"  # not a protobuf / wrong vocabulary
    garbage.write_bytes(b"\xff" * 64)
    pytest.importorskip("sentencepiece")
    with pytest.raises(ValueError, match="garbage.model"):
        convert_llama2c(CKPT, garbage, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# committed assets
# --------------------------------------------------------------------------------------------


def test_committed_assets_match_fresh_conversion(hf_dir):
    if not (ASSETS / "model.safetensors").is_file():
        pytest.fail(f"{ASSETS} is missing; run python -m deepwhale.checkpoint.llama2c")
    from safetensors.numpy import load_file

    ours, fresh = load_file(ASSETS / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert ours.keys() == fresh.keys()
    for k in fresh:
        np.testing.assert_array_equal(ours[k], fresh[k], err_msg=k)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "generation_config.json",
    ):
        assert (ASSETS / name).read_text() == (hf_dir / name).read_text(), name
    assert "Karpathy" in (ASSETS / "README.md").read_text()
