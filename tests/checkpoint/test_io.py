"""Checkpoint loading and saving: layouts, FP8, sharding, round trips through transformers, and
precise errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepwhale.checkpoint.hub import CheckpointError, resolve_checkpoint
from deepwhale.checkpoint.io import INDEX_NAME, load_model, save_model
from deepwhale.checkpoint.keys import dequantize_fp8, quantize_fp8
from deepwhale.model.config import ConfigError
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from tests.helpers import make_hf_model

IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))


def _random_model(flavour: str, seed: int = 0, **overrides) -> CausalLM:
    model = CausalLM(flavour_config(flavour, **overrides)).eval()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("flavour", ["debug-v3", "debug-v2", "debug-llama"])
def test_save_then_transformers_loads_identical_logits(flavour, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _random_model(flavour)
    for name, buf in ours.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0, 0.05)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = IDS % ours.config.vocab_size
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4
    again = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_sharded_save_and_load(tmp_path):
    ours = _random_model("debug-v3")
    files = save_model(ours, tmp_path, max_shard_size=200_000)
    assert len(files) > 2 and (tmp_path / INDEX_NAME).exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    again = load_model(tmp_path)
    ids = IDS % 512
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    # re-saving as one file removes the stale index, so the loader does not follow it
    save_model(ours, tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()
    assert load_model(tmp_path).config == ours.config


def test_fused_expert_layout_loads(tmp_path):
    """transformers 5.x holds experts fused; a checkpoint written that way loads too."""
    hf = make_hf_model("deepseek_v3", tmp_path / "hub", q_lora_rank=24, n_group=2, topk_group=1)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    ours = load_model(fused)
    with torch.no_grad():
        assert (ours(IDS) - hf(IDS).logits).abs().max().item() <= 1e-4


def test_fp8_block_scaled_checkpoint(tmp_path):
    """DeepSeek-V3's release format: float8_e4m3fn weights + weight_scale_inv per block."""
    ours = _random_model("debug-v3")
    save_model(ours, tmp_path)
    block = [16, 16]  # small blocks so the tiny matrices span several, with partial edges
    state = load_file(str(tmp_path / "model.safetensors"))
    fp8 = {}
    for k, v in list(state.items()):
        if v.dim() == 2 and "embed_tokens" not in k and "mlp.gate." not in k and "lm_head" not in k:
            q, s = quantize_fp8(v, tuple(block))
            fp8[k] = (q, s)
            state[k], state[k + "_scale_inv"] = q, s
    assert fp8
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path)
    params = dict(loaded.named_parameters())
    for k, (q, s) in fp8.items():
        assert torch.equal(params[k], dequantize_fp8(q, s, tuple(block)))
    ids = IDS % 512
    with torch.no_grad():
        ref, got = ours(ids), loaded(ids)
    # e4m3 keeps 3 mantissa bits: near the fp32 model (these random weights amplify the error)
    assert ((got - ref).norm() / ref.norm()).item() < 0.3
    assert not torch.equal(got, ref)
    # re-saving writes the dequantized weights, so the FP8 quantization_config must go
    save_model(loaded, tmp_path / "resaved")
    assert "quantization_config" not in json.loads(
        (tmp_path / "resaved" / "config.json").read_text()
    )


def test_fp8_errors(tmp_path):
    w = torch.randn(40, 24)
    q, s = quantize_fp8(w, (16, 16))
    assert s.shape == (3, 2)
    assert (dequantize_fp8(q, s, (16, 16)) - w).abs().max() < 0.1 * w.abs().max()
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_fp8(q, s[:2], (16, 16))
    ours = _random_model("debug-llama")
    save_model(ours, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    state[key] = quantize_fp8(state[key])[0]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{key}' has no '{key}_scale_inv'"):
        load_model(tmp_path)


def test_mtp_layers_and_rotary_buffers_are_skipped(tmp_path):
    ours = _random_model("debug-v3", num_nextn_predict_layers=1)
    save_model(ours, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    n = ours.config.num_hidden_layers
    state[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)  # V3 MTP module
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    load_model(tmp_path)


# ------------------------------------------------------------------------------ broken input
@pytest.fixture
def saved(tmp_path):
    save_model(_random_model("debug-llama"), tmp_path)
    return tmp_path


def test_truncated_file_names_the_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_model(saved)
    path.write_bytes(b"\x10")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(saved)


def test_missing_tensor_names_the_key(saved):
    state = load_file(str(saved / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"1 tensor\(s\) missing .*model\.layers\.1\.mlp\.up_proj"
    ):
        load_model(saved)


def test_unexpected_tensor_names_key_and_file(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_norm\.weight \(in model\.safetensors\)"):
        load_model(saved)


def test_wrong_shape_names_key_file_and_shapes(saved):
    state = load_file(str(saved / "model.safetensors"))
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(65,\), but this config needs \(64,\)",
    ):
        load_model(saved)


def test_folder_problems(saved, tmp_path):
    (saved / "model.safetensors").rename(saved / "weights.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files \(found weights\.bin"):
        load_model(saved)
    (saved / INDEX_NAME).write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match="names shard model-00001-of-00002.safetensors"):
        load_model(saved)
    (saved / INDEX_NAME).write_text("{")
    with pytest.raises(CheckpointError, match="malformed safetensors index"):
        load_model(saved)
    (saved / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        load_model(saved)


def test_resolve_checkpoint_errors(tmp_path, monkeypatch):
    assert resolve_checkpoint(tmp_path) == tmp_path
    bundled = resolve_checkpoint("stories260K")  # a bundled model by bare name
    assert bundled.name == "stories260K" and (bundled / "model.safetensors").is_file()
    with pytest.raises(
        CheckpointError, match="no such checkpoint folder.*bundled models: .*stories260K"
    ):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "f.txt")
    # offline: huggingface_hub refuses, and the message says how to use a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        CheckpointError, match=r"could not fetch 'deepseek-ai/DeepSeek-V3'.*pass its path"
    ):
        resolve_checkpoint("deepseek-ai/DeepSeek-V3")


def test_one_owner_of_the_bundled_models_paths():
    """checkpoint.hub knows the bundled folders; the public names elsewhere are its objects."""
    from deepwhale import api
    from deepwhale.checkpoint.hub import BUNDLED, DEFAULT_MODEL, bundled
    from deepwhale.data.pack import tokenizer_folder
    from deepwhale.train.trainer import BUNDLED_TOKENIZER

    assert DEFAULT_MODEL == BUNDLED / "stories260K" == bundled("stories260K")
    assert api.DEFAULT_MODEL is DEFAULT_MODEL and BUNDLED_TOKENIZER is DEFAULT_MODEL
    assert tokenizer_folder(None) == DEFAULT_MODEL == resolve_checkpoint("stories260K")
    assert bundled("deepwhale-demo") == BUNDLED / "deepwhale-demo"
    assert bundled("no-such-model") is None and bundled("a/stories260K") is None


def test_layers_beyond_the_config_are_unexpected(tmp_path):
    """Only DeepSeek-V3's MTP layers may sit past num_hidden_layers; others are an error."""
    ours = _random_model("debug-llama")
    save_model(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*model\.layers\.1\."):
        load_model(tmp_path)


def test_tied_config_with_a_different_lm_head_is_an_error(tmp_path):
    ours = _random_model("debug-llama")  # untied
    save_model(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens"):
        load_model(tmp_path)
    # a tied checkpoint that stores an identical lm_head copy loads (some Qwen2 releases do)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    tied = load_model(tmp_path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_duplicate_tensor_across_files_and_index_mismatch(tmp_path):
    ours = _random_model("debug-llama")
    save_model(ours, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    save_file(
        {"model.norm.weight": state["model.norm.weight"] * 2}, str(tmp_path / "b.safetensors")
    )
    with pytest.raises(
        CheckpointError, match="'model.norm.weight' is in both a.safetensors and b.safetensors"
    ):
        load_model(tmp_path)
    index = {"weight_map": {k: "a.safetensors" for k in state}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    load_model(tmp_path)  # the index names the shards: the stray b.safetensors is not read
    index["weight_map"]["model.norm.weight"] = "b.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index maps it to b.safetensors"):
        load_model(tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"weight_map": [1, 2]}')
    with pytest.raises(CheckpointError, match="weight_map must map tensor names"):
        load_model(tmp_path)


def test_wrong_dtype_and_nan_weights(saved):
    state = load_file(str(saved / "model.safetensors"))
    good = state["model.norm.weight"]
    state["model.norm.weight"] = good.to(torch.int32)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int32"):
        load_model(saved)
    bad = good.clone()
    bad[3] = float("nan")
    state["model.norm.weight"] = bad
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' contains NaN or Inf"):
        load_model(saved)


def test_save_housekeeping(tmp_path):
    ours = _random_model("debug-v3")
    save_model(ours, tmp_path, max_shard_size=200_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    save_model(ours, tmp_path)
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert (tmp_path / "config.json").stat().st_mode & 0o044  # readable by others (umask 022)
    with pytest.raises(ValueError, match="max_shard_size must be a positive"):
        save_model(ours, tmp_path, max_shard_size=0)
