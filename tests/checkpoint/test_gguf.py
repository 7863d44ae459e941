"""GGUF export: tensors and metadata read back with the gguf package; llama.cpp parity if present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel
from deepwhale.checkpoint.gguf import export_gguf, to_interleaved
from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.io import load_model, save_model
from deepwhale.cli import app
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]]


def test_export_reads_back(tmp_path):
    path = export_gguf(DEFAULT_MODEL, tmp_path / "s.gguf")
    r = gguf.GGUFReader(str(path))
    model = load_model(DEFAULT_MODEL)
    c = model.config
    assert int(_field(r, "llama.block_count")[0]) == c.num_hidden_layers
    assert int(_field(r, "llama.attention.head_count_kv")[0]) == c.num_key_value_heads
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    assert "output.weight" not in tensors  # tied embeddings
    q = torch.from_numpy(tensors["blk.2.attn_q.weight"].reshape(c.hidden_size, c.hidden_size))
    assert torch.equal(q, to_interleaved(model.model.layers[2].self_attn.q_proj.weight, 8))
    emb = torch.from_numpy(tensors["token_embd.weight"]).reshape(c.vocab_size, c.hidden_size)
    assert torch.equal(emb, model.model.embed_tokens.weight)
    tokens = [
        bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in r.fields["tokenizer.ggml.tokens"].data[:5]
    ]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]


def test_interleave_is_a_per_head_permutation():
    w = torch.arange(16.0).view(8, 2)  # two heads of dim 4
    assert to_interleaved(w, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_cli_and_errors(tmp_path):
    r = CliRunner().invoke(
        app, ["export", "gguf", "--out", str(tmp_path / "a.gguf"), "--dtype", "f16"]
    )
    assert r.exit_code == 0, r.output
    assert gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors[2].data.dtype == np.float16
    v3 = CausalLM(flavour_config("debug-v3"))
    v3.init_weights()
    save_model(v3, tmp_path / "v3")
    with pytest.raises(CheckpointError, match="plain LLaMA layout"):
        export_gguf(tmp_path / "v3", tmp_path / "v3.gguf")
    with pytest.raises(ValueError, match="dtype must be"):
        export_gguf(DEFAULT_MODEL, tmp_path / "x.gguf", dtype="q4")
    r = CliRunner().invoke(
        app, ["export", "gguf", "-m", str(tmp_path / "v3"), "--out", str(tmp_path / "b.gguf")]
    )
    assert r.exit_code == 2 and "plain LLaMA layout" in r.output


def test_llama_cpp_greedy_matches(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(DEFAULT_MODEL, tmp_path / "s.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    ids = llm.tokenize(b"Once upon a time")
    ours = DeepSeekModel.from_pretrained()
    assert ids == ours.tokenizer.encode("Once upon a time")
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == 40:
            break
    from deepwhale.inference.engine import Engine
    from deepwhale.inference.sampling import SamplingParams

    eng = Engine(ours.module, ours.tokenizer, max_batch_size=1, max_seq_len=512)
    req = eng.generate([ids], SamplingParams(temperature=0, max_new_tokens=40))[0]
    assert req.sequences[0].output_ids == out
