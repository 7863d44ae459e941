"""The typer commands, driven through a small app assembled here (deepwhale/cli.py is not ours)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from deepwhale.train.cli import finetune_app, lora_app, train
from deepwhale.train.trainer import BUNDLED_TOKENIZER


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("train")(train)
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(lora_app, name="lora")
    return app


def test_train_command(tmp_path, shakespeare):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name: debug-llama}}\ndata: {{path: {shakespeare}, seq_len: 33, limit: 100}}\n"
        "train: {steps: 3, micro_batch_size: 2}\nlog: {tensorboard: false}\n"
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(
        _app(),
        [
            "train",
            "-c",
            str(cfg),
            "optim.lr=1e-3",
            "--set",
            "log.interval=1",
            "--out-dir",
            str(out),
            "--resume",
            "auto",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "done: step 3" in res.output and (out / "final" / "model.safetensors").exists()
    res = CliRunner().invoke(_app(), ["train", "-c", str(cfg), "--set", "optim.lrr=1", "-q"])
    assert res.exit_code == 2
    assert "unknown config key 'optim.lrr'; valid keys in optim: lr," in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(_app(), ["train", "-q", "data.path=/nonexistent/x.txt"])
    assert res.exit_code == 2 and "data path not found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [debug-llama\n")
    res = CliRunner().invoke(_app(), ["train", "-c", str(bad), "-q"])
    assert res.exit_code == 2 and f"error: {bad}:3: malformed YAML (" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_finetune_lora_on_gsm8k(tmp_path, gsm8k):
    out = tmp_path / "sft"
    res = CliRunner().invoke(
        _app(),
        [
            "finetune",
            "lora",
            "--model",
            str(BUNDLED_TOKENIZER),
            "--data",
            str(gsm8k),
            "--out-dir",
            str(out),
            "--steps",
            "2",
            "--limit",
            "8",
            "--micro-batch-size",
            "2",
            "--r",
            "4",
            "-q",
            "--set",
            "log.tensorboard=false",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "adapter" / "adapter_config.json").exists()
    res = CliRunner().invoke(
        _app(),
        [
            "lora",
            "merge",
            "--model",
            str(BUNDLED_TOKENIZER),
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(tmp_path / "merged"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    res = CliRunner().invoke(
        _app(), ["finetune", "lora", "--model", str(tmp_path / "nope"), "--data", str(gsm8k)]
    )
    assert res.exit_code == 2 and "model folder not found" in res.output
