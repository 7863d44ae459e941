"""DCP checkpoints of parallel runs: bit-exact resume on the same layout, resharded resume on
one process, HF export of the final weights, and bad layouts refused before any process group."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deepwhale.train.config import load_config
from deepwhale.train.trainer import Trainer
from tests.parallel.launch import losses, torchrun, write_config
from tests.parallel.test_equivalence import base


def _cfg(tmp, data, steps, **extra):
    d = base(tmp / "run", data, "debug-v3", 2)
    d["train"]["steps"] = steps
    d["schedule"] = {"name": "constant", "warmup_steps": 2}  # the same lr whatever train.steps
    d["checkpoint"] = {"interval": 5, "keep_last": 3, "save_final": True, "resume": "auto"}
    for k, v in extra.items():
        d[k] = v
    return d


def test_resume_same_layout_is_bit_exact_and_reshards_to_one_process(tmp_path, shakespeare):
    # uninterrupted 10 steps at dp=2
    full = tmp_path / "full"
    full.mkdir()
    cfg = write_config(full / "cfg.yaml", _cfg(full, shakespeare, 10))
    proc = torchrun(2, ["-c", str(cfg), "--parallel", "dp=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # interrupted: 5 steps, then the same command continues to 10 from the DCP checkpoint
    part = tmp_path / "part"
    part.mkdir()
    cfg5 = write_config(part / "cfg.yaml", _cfg(part, shakespeare, 5))
    assert torchrun(2, ["-c", str(cfg5), "--parallel", "dp=2"]).returncode == 0
    ck = part / "run" / "checkpoints" / "step-00000005"
    assert (ck / ".metadata").is_file() and (ck / "state.json").is_file()
    cfg10 = write_config(part / "cfg10.yaml", _cfg(part, shakespeare, 10))
    proc = torchrun(2, ["-c", str(cfg10), "--parallel", "dp=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(part / "run") == losses(full / "run")  # bit for bit
    a = load_file(str(part / "run" / "final" / "model.safetensors"))
    b = load_file(str(full / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)

    # the dp=2 checkpoint of step 5 resumed on one process (DCP reshards): the one-process
    # continuation with the global micro-batch matches the parallel run
    one = tmp_path / "one"
    d = _cfg(one, shakespeare, 10)
    d["train"]["micro_batch_size"] = 4
    d["checkpoint"]["resume"] = str(ck)
    trainer = Trainer(load_config(write_config(tmp_path / "one.yaml", d)))
    assert trainer.step == 5
    hist = trainer.fit()
    want = losses(full / "run")[5:]
    got = [h["loss"] for h in hist]
    assert got == pytest.approx(want, rel=1e-5)

    # the exported final folder loads in transformers with the same logits as ours
    import transformers

    from deepwhale.checkpoint.io import load_model

    ours = load_model(full / "run" / "final", dtype=torch.float32, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(full / "run" / "final"))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_bad_layout_exits_2_with_one_line_before_any_process_group(tmp_path, shakespeare):
    cfg = write_config(tmp_path / "cfg.yaml", _cfg(tmp_path, shakespeare, 2))
    proc = torchrun(2, ["-c", str(cfg), "--parallel", "tp=3"], timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]  # rank 0 only
    assert "tp=3" in lines[0] and "world size 2" in lines[0]
    proc = torchrun(2, ["-c", str(cfg), "--parallel", "tp=2,pp=4"], timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "world size 2" in lines[0]


def test_parallel_without_torchrun_says_how_to_start_it(tmp_path, shakespeare, monkeypatch):
    from deepwhale.cli import app

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = write_config(tmp_path / "cfg.yaml", _cfg(tmp_path, shakespeare, 2))
    res = CliRunner().invoke(app, ["train", "-c", str(cfg), "--parallel", "tp=2"])
    assert res.exit_code == 2
    assert "torchrun --nproc-per-node 2" in res.output
    res = CliRunner().invoke(app, ["train", "-c", str(cfg), "--parallel", "tq=2"])
    assert res.exit_code == 2 and "unknown degree 'tq'" in res.output


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["parallel.tp=3"], "num_attention_heads"),
        (["parallel.pp=8"], "num_hidden_layers"),
        (["parallel.ep=3", "parallel.dp=3"], "n_routed_experts"),
        (["parallel.tp=2", "data.seq_len=32"], "divisible by tp"),
        (["parallel.dp=2", "parallel.grad_compression.method=topk", "parallel.tp=2"], "DDP"),
        (
            ["parallel.pp=2", "train.activation_checkpointing=full", "train.compile=true"],
            "count the router statistics twice",
        ),
    ],
)
def test_preflight_names_the_constraint(tmp_path, shakespeare, overrides, needle):
    from deepwhale.parallel.layout import LayoutError
    from deepwhale.parallel.runtime import preflight

    cfg = load_config(write_config(tmp_path / "c.yaml", _cfg(tmp_path, shakespeare, 2)), overrides)
    world = cfg.parallel.fixed_size
    with pytest.raises(LayoutError, match=needle):
        preflight(cfg, world)
