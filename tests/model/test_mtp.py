"""DeepSeek-V3's multi-token-prediction module: parity with the equation computed from
transformers' pieces, and loading from a checkpoint that carries ``model.layers.{n}.*``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.io import load_model, save_model
from deepwhale.model.mtp import MultiTokenPredictor, make_mtp_cache
from tests.helpers import make_hf_model

V3 = {"q_lora_rank": 24, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}


def add_hf_mtp(hf, folder, seed: int = 7, std: float = 0.15):
    """Append a random MTP module, built from transformers' DeepseekV3DecoderLayer and
    DeepseekV3RMSNorm, to the checkpoint in ``folder`` as ``model.layers.{n}.*``; set
    ``num_nextn_predict_layers=1``. Returns the module's parts (the reference)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
        DeepseekV3RMSNorm,
    )

    cfg = copy.deepcopy(hf.config)
    n, h, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    eps = cfg.rms_norm_eps
    parts = torch.nn.ModuleDict(
        {
            "block": DeepseekV3DecoderLayer(cfg, layer_idx=n),
            "enorm": DeepseekV3RMSNorm(h, eps=eps),
            "hnorm": DeepseekV3RMSNorm(h, eps=eps),
            "eh_proj": torch.nn.Linear(2 * h, h, bias=False),
            "embed_tokens": torch.nn.Embedding(v, h),
            "head_norm": DeepseekV3RMSNorm(h, eps=eps),
            "head": torch.nn.Linear(h, v, bias=False),
        }
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in parts.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in parts.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    state = load_file(str(folder / "model.safetensors"))
    prefix = f"model.layers.{n}."
    for k, t in parts["block"].state_dict().items():
        state[prefix + k] = t.contiguous()
    names = {
        "enorm": "enorm",
        "hnorm": "hnorm",
        "eh_proj": "eh_proj",
        "embed_tokens": "embed_tokens",
        "head_norm": "shared_head.norm",
        "head": "shared_head.head",
    }
    for ours, hf_name in names.items():
        state[f"{prefix}{hf_name}.weight"] = parts[ours].weight.detach().clone()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return parts


def reference_mtp(hf, parts, ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 §2.2 with transformers' pieces: logits of the MTP module at every position."""
    with torch.no_grad():
        hidden = hf.model(ids).last_hidden_state  # after the final norm, (B, T, H)
        e = parts["enorm"](parts["embed_tokens"](next_ids))
        x = parts["eh_proj"](torch.cat([e, parts["hnorm"](hidden)], dim=-1))
        t = ids.shape[1]
        pos = torch.arange(t)[None].expand_as(ids)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        rope = hf.model.rotary_emb(x, pos)
        out = parts["block"](x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        return parts["head"](parts["head_norm"](out))


def _ids(vocab, batch=2, length=24, seed=3):
    return torch.randint(
        0, vocab, (batch, length + 1), generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture
def mtp_checkpoint(tmp_path):
    hf = make_hf_model("deepseek_v3", tmp_path, **V3)
    parts = add_hf_mtp(hf, tmp_path)
    return hf, parts, tmp_path


def test_mtp_matches_transformers_pieces(mtp_checkpoint):
    hf, parts, folder = mtp_checkpoint
    ours = load_model(folder, load_mtp=True)
    assert isinstance(ours.mtp, MultiTokenPredictor) and ours.mtp.depth == 1
    seq = _ids(hf.config.vocab_size)
    ids, next_ids = seq[:, :-1], seq[:, 1:]
    expected = reference_mtp(hf, parts, ids, next_ids)
    with torch.no_grad():
        g, got = ours.mtp(next_ids, ours.hidden_states(ids))
    assert g.shape == (*ids.shape, hf.config.hidden_size)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff:.3g}"
    assert expected.abs().max() > 0.1
    # swapping the halves of the concatenation would not match: the order is tested
    with torch.no_grad():
        w = ours.mtp.layer(0).eh_proj.weight
        h = w.shape[0]
        w.copy_(torch.cat([w[:, h:], w[:, :h]], dim=1))
        _, swapped = ours.mtp(next_ids, ours.hidden_states(ids))
    assert (swapped - expected).abs().max() > 1e-2


def test_mtp_decode_with_cache_matches_full_forward(mtp_checkpoint):
    _, _, folder = mtp_checkpoint
    ours = load_model(folder, load_mtp=True)
    seq = _ids(ours.config.vocab_size, batch=1, length=16)
    ids, next_ids = seq[:, :-1], seq[:, 1:]
    with torch.no_grad():
        hidden = ours.hidden_states(ids)
        _, full = ours.mtp(next_ids, hidden)
        cache = make_mtp_cache(ours.config, 1, 32)[0]
        steps = [ours.mtp(next_ids[:, :10], hidden[:, :10], cache=cache)[1]]
        for t in range(10, 16):
            pos = torch.full((1, 1), t)
            steps.append(ours.mtp(next_ids[:, t : t + 1], hidden[:, t : t + 1], pos, cache)[1])
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_mtp_keys_mirror_the_checkpoint_and_round_trip(mtp_checkpoint, tmp_path_factory):
    hf, _, folder = mtp_checkpoint
    n = hf.config.num_hidden_layers
    ours = load_model(folder, load_mtp=True)
    mtp_keys = set(ours.mtp.state_dict())
    assert f"model.layers.{n}.eh_proj.weight" in mtp_keys
    assert f"model.layers.{n}.shared_head.head.weight" in mtp_keys
    assert f"model.layers.{n}.self_attn.kv_a_proj_with_mqa.weight" in mtp_keys
    # every MTP tensor in the HF file (after splitting fused experts) is loaded, by identity
    disk = load_file(str(folder / "model.safetensors"))
    hf_mtp = {k for k in disk if k.startswith(f"model.layers.{n}.")}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf_mtp) or hf_mtp <= mtp_keys
    for k in hf_mtp & mtp_keys:
        assert torch.equal(ours.mtp.state_dict()[k], disk[k]), k

    out = tmp_path_factory.mktemp("saved")
    save_model(ours, out)
    saved = load_file(str(out / "model.safetensors"))
    assert mtp_keys <= set(saved) and not any(k.startswith("mtp.") for k in saved)
    again = load_model(out, load_mtp=True)
    ids = _ids(ours.config.vocab_size, batch=1)
    with torch.no_grad():
        h = ours.hidden_states(ids[:, :-1])
        assert torch.equal(ours.mtp(ids[:, 1:], h)[1], again.mtp(ids[:, 1:], h)[1])


def test_default_load_skips_mtp(mtp_checkpoint):
    _, _, folder = mtp_checkpoint
    ours = load_model(folder)
    assert not hasattr(ours, "mtp")
    assert not any(".mtp" in k or k.startswith("mtp.") for k in ours.state_dict())


def test_load_mtp_without_mtp_is_a_clear_error(tmp_path):
    make_hf_model("deepseek_v3", tmp_path, num_nextn_predict_layers=0, **V3)
    with pytest.raises(CheckpointError, match="no multi-token-prediction module"):
        load_model(tmp_path, load_mtp=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1  # the config says 1, the file holds none
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"hold no MTP tensors \(model\.layers\.3\.\*\)"):
        load_model(tmp_path, load_mtp=True)
    load_model(tmp_path)  # without load_mtp it loads as before


def test_load_mtp_for_a_non_v3_model_is_a_clear_error(tmp_path):
    make_hf_model("llama", tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_model(tmp_path, load_mtp=True)


def test_incomplete_mtp_module_names_the_missing_key(mtp_checkpoint):
    hf, _, folder = mtp_checkpoint
    n = hf.config.num_hidden_layers
    state = load_file(str(folder / "model.safetensors"))
    del state[f"model.layers.{n}.hnorm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"missing.*mtp\.model\.layers\.{n}\.hnorm"):
        load_model(folder, load_mtp=True)


def test_from_pretrained_passes_load_mtp(mtp_checkpoint):
    from deepwhale.inference.deepseek import DeepSeekModel

    _, _, folder = mtp_checkpoint
    assert not hasattr(DeepSeekModel.from_pretrained(folder, device="cpu").module, "mtp")
    model = DeepSeekModel.from_pretrained(folder, device="cpu", load_mtp=True)
    assert isinstance(model.module.mtp, MultiTokenPredictor)


def test_int8_save_of_a_model_with_mtp_leaves_the_mtp_out(mtp_checkpoint, tmp_path_factory):
    from deepwhale.inference.quantize import load_quantized, quantize_model

    _, _, folder = mtp_checkpoint
    model = load_model(folder, load_mtp=True)
    quantize_model(model, "int8")
    out = tmp_path_factory.mktemp("int8")
    from deepwhale.checkpoint.quantized import save_quantized

    save_quantized(model, out)
    assert not any(k.startswith("mtp.") for k in load_file(str(out / "model.safetensors")))
    again = load_quantized(out)
    ids = _ids(model.config.vocab_size, batch=1)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
