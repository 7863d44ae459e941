"""Activation checkpointing and compile of the decoder layers: same losses, less saved memory."""

from __future__ import annotations

import pytest
import torch

from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from deepwhale.train.ac_compile import (
    apply_activation_checkpointing,
    apply_compile,
    decoder_layers,
    is_recomputing,
    saved_activation_bytes,
)
from deepwhale.train.config import TrainConfigError, load_config
from deepwhale.train.trainer import Trainer
from tests.train.conftest import base_overrides


def _model(name: str = "debug-v3") -> CausalLM:
    m = CausalLM(flavour_config(name, vocab_size=256))
    m.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    return m.train()


def _fit(tmp_path, data, name, **kw):
    over = {
        "model.name": name,
        "data.seq_len": 33,
        "data.limit": 200,
        "train.steps": 3,
        "train.micro_batch_size": 2,
        "train.grad_accum": 2,
        "moe.aux_loss_alpha": 0.001,
        "moe.bias_update_speed": 0.001,
        "log.interval": 1,
        **kw,
    }
    tr = Trainer(load_config(None, base_overrides(tmp_path, data, **over)))
    torch.manual_seed(0)
    hist = tr.fit()
    return [h["loss"] for h in hist], {
        k: v.detach().clone() for k, v in tr.model.state_dict().items()
    }


@pytest.mark.parametrize("name", ["debug-llama", "debug-v3"])
def test_checkpointing_gives_bitwise_the_same_training(tmp_path, shakespeare, name):
    plain = _fit(tmp_path / "a", shakespeare, name)
    ac = _fit(tmp_path / "b", shakespeare, name, **{"train.activation_checkpointing": "full"})
    assert ac[0] == plain[0]  # recompute replays the same fp32 ops on CPU
    assert ac[1].keys() == plain[1].keys()  # no renamed parameter
    for k, v in plain[1].items():
        assert torch.equal(ac[1][k], v), k


def test_checkpointing_cuts_saved_activations_and_marks_the_replay():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 32))
    plain = _model()
    ac = _model()
    n_layers = len(decoder_layers(ac))
    assert apply_activation_checkpointing(ac, "full") == n_layers
    full_bytes, ac_bytes = saved_activation_bytes(plain, ids), saved_activation_bytes(ac, ids)
    assert ac_bytes < full_bytes / 3, (ac_bytes, full_bytes)

    seen = []
    attn = decoder_layers(ac)[0].self_attn  # (not the layer's last module: recompute stops early)
    attn.register_forward_hook(lambda m, a, o: seen.append(is_recomputing()))
    out = ac(ids)
    assert seen == [False]
    out.float().pow(2).mean().backward()
    assert seen == [False, True]  # backward replayed the layer's forward, marked
    assert not is_recomputing()
    with torch.no_grad():  # evaluation does not checkpoint: the same logits, nothing replayed
        torch.testing.assert_close(ac(ids), plain(ids), rtol=0, atol=0)


def test_every_nth_layer_and_bad_modes():
    m = _model("debug-llama")
    n = len(decoder_layers(m))
    assert apply_activation_checkpointing(_model("debug-llama"), "full", every=2) == (n + 1) // 2
    assert apply_activation_checkpointing(m, "none") == 0
    with pytest.raises(ValueError, match="activation_checkpointing: 'some'"):
        apply_activation_checkpointing(m, "some")
    with pytest.raises(ValueError, match="ac_every: must be >= 1"):
        apply_activation_checkpointing(m, "full", every=0)


def test_config_rejects_bad_values(tmp_path, shakespeare):
    for key, value, msg in [
        ("train.activation_checkpointing", "some", "train.activation_checkpointing: 'some'"),
        ("train.ac_every", "0", "train.ac_every: must be > 0"),
        ("train.compile", "maybe", "train.compile: expected true or false"),
    ]:
        with pytest.raises(TrainConfigError, match=msg):
            load_config(None, base_overrides(tmp_path, shakespeare, **{key: value}))
    cfg = load_config(
        None,
        base_overrides(
            tmp_path, shakespeare, **{"train.compile": "true", "train.compile_backend": "nope"}
        ),
    )
    with pytest.raises(
        TrainConfigError,
        match="train.compile_backend: 'nope' is not a torch.compile backend; e.g. .*inductor",
    ):
        Trainer(cfg)


def test_compile_keeps_names_and_matches_eager(tmp_path, shakespeare):
    m = _model("debug-llama")
    keys = list(m.state_dict())
    assert apply_compile(m, "aot_eager") == len(decoder_layers(m))
    assert list(m.state_dict()) == keys
    # dynamo + AOTAutograd (forward and backward graphs), with checkpointing traced inside
    eager = _fit(tmp_path / "a", shakespeare, "debug-v3")
    both = _fit(
        tmp_path / "b",
        shakespeare,
        "debug-v3",
        **{
            "train.activation_checkpointing": "full",
            "train.compile": "true",
            "train.compile_backend": "aot_eager",
        },
    )
    assert both[0] == pytest.approx(eager[0], rel=1e-6)
    for k, v in eager[1].items():
        torch.testing.assert_close(both[1][k], v, rtol=1e-5, atol=1e-6)
