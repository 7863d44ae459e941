"""LoRA via PEFT: trainable share, interoperability with PEFT on transformers, merging."""

from __future__ import annotations

import json

import pytest
import torch

from deepwhale.checkpoint.io import load_model
from deepwhale.lora import (
    LoraError,
    apply_lora,
    default_target_modules,
    load_adapter,
    merge_adapter_folder,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from tests.helpers import make_hf_model


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_trainable_share_on_a_realistic_config(capsys):
    with torch.device("meta"):
        model = CausalLM(flavour_config("bench-llama-58m"))
    lora = apply_lora(model, r=16, lora_alpha=32)
    trainable, total = trainable_parameters(lora)
    # per layer: 4 attention projections r*(512+512) + 3 MLP projections r*(512+1376)
    assert trainable == 8 * 16 * (4 * 1024 + 3 * (512 + 1376))
    assert 0.015 < trainable / total < 0.03  # about 2%
    assert "trainable params 1,249,280" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("deepseek_v3", {"q_lora_rank": 24, "n_group": 4, "topk_group": 2}),
        (
            "deepseek_v32",  # MLA adapted, the lightning indexer (top-4 of 10 tokens) frozen
            {
                "q_lora_rank": 24,
                "n_group": 4,
                "topk_group": 2,
                "index_n_heads": 8,
                "index_head_dim": 16,
                "index_topk": 4,
            },
        ),
    ],
)
def test_adapter_loads_in_peft_on_transformers(tmp_path, model_type, overrides):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    make_hf_model(model_type, tmp_path / "base", **overrides)
    ours = apply_lora(load_model(tmp_path / "base"), r=4, lora_alpha=8, verbose=False)
    _randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    first = "q_a_proj" if model_type.startswith("deepseek") else "q_proj"
    assert f"base_model.model.model.layers.0.self_attn.{first}.lora_A.weight" in keys
    assert not any(".experts." in k or ".indexer." in k for k in keys)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    ours.eval()
    with torch.no_grad():
        got, want = ours(x), hf(input_ids=x).logits
        plain = load_model(tmp_path / "base")(x)
    assert (got - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # and back: the adapter loads onto a fresh deepwhale model with identical logits
    again = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), got, rtol=0, atol=0)


def test_merge_matches_unmerged_and_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from deepwhale.train.cli import lora_app

    make_hf_model("deepseek_v3", tmp_path / "base", q_lora_rank=24, n_group=4, topk_group=2)
    model = apply_lora(load_model(tmp_path / "base"), r=8, lora_alpha=16, verbose=False)
    _randomize_lora(model, seed=3)
    save_adapter(model, tmp_path / "adapter")
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)
        assert isinstance(merged, CausalLM)
        torch.testing.assert_close(merged(x), unmerged, rtol=0, atol=1e-5)

    app = typer.Typer()
    app.add_typer(lora_app, name="lora")
    out = tmp_path / "merged"
    res = CliRunner().invoke(
        app,
        [
            "lora",
            "merge",
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), unmerged, rtol=0, atol=1e-5)
    res = CliRunner().invoke(
        app,
        [
            "lora",
            "merge",
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "nope"),
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "no adapter_config.json" in res.output
    assert merge_adapter_folder  # exported


def test_deepseekmodel_and_errors(tmp_path):
    from deepwhale.api import DeepSeekModel

    dsm = DeepSeekModel.from_pretrained(device="cpu")  # bundled stories260K (llama)
    before = dsm.generate("Once upon a time", max_new_tokens=8, temperature=0)
    assert apply_lora(dsm, r=2, verbose=False) is dsm
    assert dsm.generate("Once upon a time", max_new_tokens=8, temperature=0) == before  # B = 0
    assert trainable_parameters(dsm)[0] > 0
    with pytest.raises(LoraError, match="already has LoRA"):
        apply_lora(dsm)
    save_adapter(dsm, tmp_path / "a")
    assert isinstance(merge_lora(dsm).module, CausalLM)
    assert isinstance(load_adapter(dsm, tmp_path / "a").module.base_model.model, CausalLM)

    model = CausalLM(flavour_config("debug-v3"))
    assert default_target_modules(model.config) == [
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
    ]
    assert "q_proj" in default_target_modules(flavour_config("debug-v2"))
    with pytest.raises(LoraError, match="wq not found.*kv_b_proj"):
        apply_lora(model, target_modules=["wq"])
    with pytest.raises(LoraError, match="positive integer"):
        apply_lora(model, r=0)
    with pytest.raises(LoraError, match="no LoRA adapters"):
        save_adapter(model, tmp_path / "x")
    with pytest.raises(LoraError, match="no LoRA adapters to merge"):
        merge_lora(model)
    with pytest.raises(LoraError, match="no adapter_config.json"):
        load_adapter(model, tmp_path / "missing")
    with pytest.raises(TypeError, match="expected a deepwhale CausalLM"):
        apply_lora("model")


def test_save_pretrained_refuses_a_lora_wrapped_model(tmp_path):
    from deepwhale.api import DeepSeekModel, apply_lora

    model = apply_lora(DeepSeekModel.from_pretrained(device="cpu"), r=2, verbose=False)
    with pytest.raises(ValueError, match="LoRA adapters"):
        model.save_pretrained(tmp_path / "out")


def test_merge_refuses_an_adapter_made_for_another_model(tmp_path):
    import typer
    from typer.testing import CliRunner

    from deepwhale.checkpoint.io import save_model
    from deepwhale.train.cli import lora_app
    from deepwhale.train.trainer import BUNDLED_TOKENIZER

    # an adapter for the 5-layer stories260K, recording its base folder
    lora = apply_lora(load_model(BUNDLED_TOKENIZER), r=2, verbose=False)
    save_adapter(lora, tmp_path / "adapter", base_model=BUNDLED_TOKENIZER)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(BUNDLED_TOKENIZER.resolve())
    for flavour in ("debug-llama", "debug-v3"):  # fewer layers / other widths; MLA
        net = CausalLM(flavour_config(flavour, vocab_size=512))
        net.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
        save_model(net, tmp_path / flavour)
        with pytest.raises(LoraError, match=r"does not fit this model: \d+ key\(s\) do not match"):
            merge_adapter_folder(tmp_path / flavour, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # the other way round: layers the adapter targets but has no tensors for
    small = apply_lora(load_model(tmp_path / "debug-llama"), r=2, verbose=False)
    save_adapter(small, tmp_path / "small")
    with pytest.raises(LoraError, match="targeted, but the adapter has no tensors"):
        load_adapter(load_model(BUNDLED_TOKENIZER), tmp_path / "small")

    app = typer.Typer()
    app.add_typer(lora_app, name="lora")

    def merge(adapter):
        args = ["--model", str(tmp_path / "debug-llama"), "--adapter", str(adapter)]
        return CliRunner().invoke(app, ["lora", "merge", *args, "--out", str(tmp_path / "o")])

    res = merge(tmp_path / "adapter")
    assert res.exit_code == 2 and "does not fit this model" in res.output
    assert "Traceback" not in res.output

    # a truncated weights file and a malformed config are named, exit 2
    weights = tmp_path / "small" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    res = merge(tmp_path / "small")
    assert res.exit_code == 2 and "adapter_model.safetensors: unreadable" in res.output
    (tmp_path / "small" / "adapter_config.json").write_text("{oops")
    res = merge(tmp_path / "small")
    assert res.exit_code == 2 and "adapter_config.json: malformed adapter config" in res.output


def test_peft_import_is_quiet():
    import logging

    from deepwhale.lora import _NOISY_LOGGERS, _quiet_peft_import

    with _quiet_peft_import():
        assert all(logging.getLogger(n).level == logging.ERROR for n in _NOISY_LOGGERS)
    assert all(logging.getLogger(n).level != logging.ERROR for n in _NOISY_LOGGERS)
