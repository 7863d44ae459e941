"""The training loop on real text: loss falls, accumulation is exact, resume is bit-exact."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from deepwhale.train import checkpoint as ckpt
from deepwhale.train.config import TrainConfigError, load_config
from deepwhale.train.trainer import Trainer, check_context
from tests.train.conftest import base_overrides


def make(out, data, **kw) -> Trainer:
    return Trainer(load_config(None, base_overrides(out, data, **kw)))


def test_loss_falls_on_real_text_and_final_model_loads(tmp_path, shakespeare):
    out = tmp_path / "run"
    tr = make(
        out,
        shakespeare,
        **{
            "model.name": "debug-v3",
            "data.seq_len": 65,
            "data.val_fraction": 0.1,
            "train.steps": 30,
            "train.micro_batch_size": 8,
            "optim.lr": 3e-3,
            "schedule.warmup_steps": 5,
            "eval.interval": 15,
            "eval.max_batches": 4,
            "log.interval": 5,
            "log.tensorboard": "true",
            "checkpoint.save_final": "true",
            "moe.aux_loss_alpha": 0.001,
        },
    )
    before = tr.evaluate()["val_loss"]
    bias0 = [g.e_score_correction_bias.clone() for g in tr.monitor.gates]
    hist = tr.fit()
    losses = [h["loss"] for h in hist]
    assert abs(losses[0] - math.log(512)) < 0.3  # random init starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert hist[-1]["val_loss"] < before - 1.0
    assert hist[-1]["val_ppl"] == pytest.approx(math.exp(hist[-1]["val_loss"]))
    assert all(h["aux_loss"] > 0 for h in hist)
    # the noaux_tc bias moved by gamma * sign(.) per step
    moved = [
        (g.e_score_correction_bias - b).abs().max()
        for g, b in zip(tr.monitor.gates, bias0, strict=True)
    ]
    assert all(0 < float(m) <= 30 * 0.001 + 1e-6 for m in moved)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[2]["val_loss"] and not rows[0]["val_loss"]
    assert any((out / "tb").iterdir())

    # the final HF folder loads in deepwhale and transformers with the trained logits
    from transformers import AutoModelForCausalLM

    from deepwhale.api import DeepSeekModel

    final = out / "final"
    assert (final / "tokenizer.json").exists()
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    tr.model.eval()
    with torch.no_grad():
        ref = tr.model(x)
        ours = DeepSeekModel.from_pretrained(final, device="cpu")(x)
        hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()(x).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(hf, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flavour", ["debug-llama", "debug-v2"])
def test_accumulation_matches_one_big_batch(tmp_path, chat_jsonl, flavour):
    common = {
        "model.name": flavour,
        "data.seq_len": 96,
        "moe.aux_loss_alpha": 0.01,
        "moe.seq_aux": "true",
    }
    big = make(tmp_path / "a", chat_jsonl, **common, **{"train.micro_batch_size": 8})
    small = make(
        tmp_path / "b",
        chat_jsonl,
        **common,
        **{"train.micro_batch_size": 1, "train.grad_accum": 8},
    )
    b_big, b_small = big.next_batches(), small.next_batches()
    counts = [int((b["labels"] != -100).sum()) for b in b_small]
    assert len(set(counts)) > 3  # micro-batches hold different numbers of real tokens
    assert torch.equal(
        b_big[0]["input_ids"][0, : len(b_small[0]["input_ids"][0])], b_small[0]["input_ids"][0]
    )
    m_big, m_small = big.backward_window(b_big), small.backward_window(b_small)
    assert m_big["tokens"] == m_small["tokens"] == sum(counts)
    # float(): pytest >= 9.2's approx cannot iterate a 0-d tensor
    assert float(m_big["loss"]) == pytest.approx(float(m_small["loss"]), rel=1e-5)
    if flavour == "debug-v2":
        assert float(m_big["aux_loss"]) == pytest.approx(float(m_small["aux_loss"]), rel=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), small.model.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_is_bit_exact_and_skips_partial_checkpoints(tmp_path, shakespeare, caplog):
    kw = {
        "model.name": "debug-v3",
        "data.seq_len": 33,
        "train.steps": 6,
        "train.micro_batch_size": 4,
        "train.grad_accum": 2,
        "checkpoint.interval": 2,
        "checkpoint.keep_last": 2,
        "moe.aux_loss_alpha": 0.01,
        "moe.bias_update_speed": 0.01,
        "log.interval": 1,
        "schedule.warmup_steps": 2,
        "data.limit": 200,
    }
    full = make(tmp_path / "a", shakespeare, **kw)
    ref = full.fit()

    out = tmp_path / "b"
    crashed = make(out, shakespeare, **kw)
    crashed.fit(max_steps=5)  # "dies" after step 5; last complete checkpoint is step 4
    root = out / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000002", "step-00000004"]
    # a crash while writing step 6: a half-written folder under the final name and a temp dir
    partial = root / "step-00000006"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"partial")
    (root / ".tmp-step-00000008-4194311").mkdir()
    bad_state = root / "step-00000010"
    bad_state.mkdir()
    (bad_state / "state.json").write_text('{"complete": true, "files": {"model.pt": 5}}')
    assert ckpt.latest_checkpoint(root).name == "step-00000004"

    with caplog.at_level("WARNING", logger="deepwhale.train.trainer"):
        resumed = make(out, shakespeare, **kw, **{"checkpoint.resume": "auto"})
    assert resumed.resumed_from.name == "step-00000004" and resumed.step == 4
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and "step-00000006" in skipped[0] and "step-00000010" in skipped[1]
    rest = resumed.fit()
    assert [h["step"] for h in rest] == [5, 6]
    for got, want in zip(rest, ref[4:], strict=True):
        assert got["loss"] == want["loss"]  # bit-exact
        assert got["lr"] == want["lr"]
        assert got["tokens"] == want["tokens"]
        assert got["grad_norm"] == want["grad_norm"]
    for (name, p), q in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]

    # the stale temporary of the dead process is gone; the newest complete checkpoints remain
    assert not (root / ".tmp-step-00000008-4194311").exists()
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000004", "step-00000006"]
    with pytest.raises(ckpt.CheckpointNotFound, match="does not match this model"):
        make(out, shakespeare, **{**kw, "checkpoint.resume": "auto", "model.name": "debug-v2"})
    with pytest.raises(ckpt.CheckpointNotFound, match="not a complete checkpoint"):
        make(out, shakespeare, **kw, **{"checkpoint.resume": str(bad_state)})


def test_staged_lr_with_lora_on_a_checkpoint(tmp_path, gsm8k):
    from deepwhale.train.trainer import BUNDLED_TOKENIZER

    tr = make(
        tmp_path / "lora",
        gsm8k,
        **{
            "model.name": str(BUNDLED_TOKENIZER),
            "data.seq_len": 384,
            "data.limit": 24,
            "train.steps": 6,
            "train.micro_batch_size": 2,
            "schedule.name": "staged",
            "schedule.stage_lrs": "[1e-5, 5e-6, 1e-6]",
            "schedule.stage_steps": "[2, 4]",
            "lora.enabled": "true",
            "lora.r": 4,
            "checkpoint.save_final": "true",
        },
    )
    base = {k: v.clone() for k, v in tr.model.state_dict().items() if "lora" not in k}
    hist = tr.fit()
    assert [h["lr"] for h in hist] == [1e-5, 1e-5, 5e-6, 5e-6, 1e-6, 1e-6]
    after = tr.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # base frozen
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").exists()
    recorded = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(BUNDLED_TOKENIZER.resolve())


def test_shards_set_the_vocabulary(tmp_path, shakespeare, caplog):
    import numpy as np

    from deepwhale.data.shards import pack, write_manifest, write_shard
    from deepwhale.tokenizer import Tokenizer
    from deepwhale.train.trainer import BUNDLED_TOKENIZER

    tok = Tokenizer.from_pretrained(BUNDLED_TOKENIZER)
    docs = [tok.encode(p) for p in shakespeare.read_text().split("\n\n")[:200]]
    rows = pack(docs, 33, tok.eos_token_id)
    shards = tmp_path / "shards"
    recs = [write_shard(shards, i, part, 640) for i, part in enumerate(np.array_split(rows, 3))]
    write_manifest(
        shards,
        recs,
        seq_len=33,
        vocab_size=640,
        eos_id=tok.eos_token_id,
        extra={"tokenizer": str(BUNDLED_TOKENIZER)},  # as the data pipeline records it
    )
    tr = make(
        tmp_path / "run",
        shards,
        **{"model.name": "debug-v3", "train.steps": 3, "train.micro_batch_size": 4},
    )
    assert tr.config.vocab_size == 640 and tr.data_format == "shards"
    hist = tr.fit()
    assert len(hist) == 3 and all(h["tokens"] == 4 * 32 for h in hist)
    assert tr.tokenizer_folder == BUNDLED_TOKENIZER  # copied into final/ for generation

    # a relative tokenizer path that does not exist from here: warned, final/ has none
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"] = "no/such/tokenizer"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="deepwhale.train.trainer"):
        tr = make(
            tmp_path / "run2",
            shards,
            **{"model.name": "debug-llama", "train.steps": 1, "checkpoint.save_final": "true"},
        )
    assert tr.tokenizer_folder is None
    assert any("final/ will have no tokenizer" in r.getMessage() for r in caplog.records)


def test_bad_settings_give_clear_errors(tmp_path, shakespeare):
    with pytest.raises(TrainConfigError, match="neither a flavour"):
        make(tmp_path, shakespeare, **{"model.name": "no-such-model"})
    with pytest.raises(Exception, match="data path not found"):
        make(tmp_path, tmp_path / "missing.txt")
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="CUDA is not available"):
            make(tmp_path, shakespeare, **{"train.device": "cuda"})
    with pytest.raises(TrainConfigError, match="unknown device"):
        make(tmp_path, shakespeare, **{"train.device": "tpu:0"})


def test_random_init_takes_special_ids_from_its_tokenizer(tmp_path, shakespeare):
    """The demo tokenizer numbers BOS/EOS 0/1 where the flavours say 1/2: the saved config must
    follow the tokenizer, or transformers would stop on the wrong token."""
    from deepwhale.checkpoint.hub import BUNDLED

    tr = make(
        tmp_path / "run",
        shakespeare,
        **{
            "model.name": "debug-v3",
            "model.tokenizer": str(BUNDLED / "deepwhale-demo"),
            "model.vocab_size": 8192,
            "train.steps": 1,
        },
    )
    assert (tr.config.bos_token_id, tr.config.eos_token_id) == (0, 1)


def test_bundled_demo_model_generates_its_recorded_samples():
    """``deepwhale generate --model deepwhale-demo`` works offline and reproduces the greedy
    samples recorded when it was exported (examples/demo/export.py)."""
    import json

    from deepwhale.api import DeepSeekModel
    from deepwhale.checkpoint.hub import BUNDLED

    folder = BUNDLED / "deepwhale-demo"
    model = DeepSeekModel.from_pretrained("deepwhale-demo", device="cpu")
    assert model.config.model_type == "deepseek_v3" and model.config.n_routed_experts == 8
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 1024**2
    samples = json.loads((folder / "training_summary.json").read_text())["samples"]
    prompt = "孔明"
    got = model.generate(prompt, max_new_tokens=40, temperature=0, repetition_penalty=1.1)
    assert got == samples[prompt]


def test_sequences_longer_than_the_context_are_refused(tmp_path, shakespeare, gsm8k):
    from deepwhale.train.trainer import BUNDLED_TOKENIZER

    check_context(513, 512, "text")  # 512 inputs fit 512 positions
    with pytest.raises(TrainConfigError, match="data.seq_len 514 needs 513 positions"):
        check_context(514, 512, "text")
    model = str(BUNDLED_TOKENIZER)  # stories260K: max_position_embeddings 512
    with pytest.raises(
        TrainConfigError,
        match="data.seq_len 1025 needs 1024 positions but the model's max_position_embeddings "
        "is 512",
    ):
        make(tmp_path, shakespeare, **{"model.name": model, "data.seq_len": 1025})
    with pytest.raises(TrainConfigError, match="data.seq_len 10000 needs 9999 positions"):
        make(
            tmp_path, gsm8k, **{"model.name": model, "data.seq_len": 10000, "lora.enabled": "true"}
        )


def test_resume_of_a_finished_run_does_nothing(tmp_path, shakespeare, caplog):
    kw = {
        "data.seq_len": 33,
        "data.limit": 50,
        "train.steps": 2,
        "train.micro_batch_size": 2,
        "checkpoint.interval": 2,
        "checkpoint.save_final": "true",
    }
    make(tmp_path, shakespeare, **kw).fit()
    final = tmp_path / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    with caplog.at_level("WARNING", logger="deepwhale.train.trainer"):
        again = make(tmp_path, shakespeare, **kw, **{"checkpoint.resume": "auto"})
        assert again.step == 2 and again.fit() == []
    assert final.stat().st_mtime_ns == stamp  # final/ not rewritten
    assert any("nothing to train" in r.getMessage() for r in caplog.records)
    with pytest.raises(TrainConfigError, match="at step 2, past train.steps=1; raise train.steps"):
        make(tmp_path, shakespeare, **{**kw, "train.steps": 1, "checkpoint.resume": "auto"})
    # every checkpoint broken: a warning naming the truncated file, then a stop (not a fresh
    # start that would overwrite the run)
    for f in (tmp_path / "checkpoints").glob("step-*/model.pt"):
        f.write_bytes(f.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepwhale.train.trainer"):
        with pytest.raises(ckpt.NoUsableCheckpoint, match="no usable checkpoint") as err:
            make(tmp_path, shakespeare, **kw, **{"checkpoint.resume": "auto"})
    assert "model.pt is 100 bytes" in str(err.value) and "\n" not in str(err.value)
    assert any("model.pt is 100 bytes" in r.getMessage() for r in caplog.records)
    fresh = make(tmp_path, shakespeare, **kw, **{"checkpoint.resume": "none"})
    assert fresh.step == 0 and fresh.resumed_from is None


def test_deepseek_v32_training_is_refused_naming_the_indexer_loss(tmp_path):
    """The lightning indexer's KL objective (DeepSeek-V3.2 §2.1.1) is not implemented: a flavour,
    a checkpoint folder or a config.json of deepseek_v32 is refused before any weight is built."""
    from types import SimpleNamespace

    from deepwhale.checkpoint.io import save_model
    from deepwhale.model.flavours import flavour_config
    from deepwhale.model.transformer import CausalLM
    from deepwhale.train.trainer import build_model

    save_model(CausalLM(flavour_config("debug-v32")), tmp_path)
    for name in ("debug-v32", str(tmp_path), str(tmp_path / "config.json")):
        section = SimpleNamespace(name=name, vocab_size=None, init_std=0.02)
        with pytest.raises(TrainConfigError, match="training deepseek_v32 is not supported"):
            build_model(section, seed=0)
