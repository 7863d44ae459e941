"""The layout planner: exact parameter counts, bubble and memory formulas, comm bytes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from deepwhale.model.flavours import FLAVOURS, flavour_config
from deepwhale.parallel.layout import LayoutError, ParallelLayout
from deepwhale.parallel.planner import (
    KNOWN_MODELS,
    PlanError,
    bubble_fraction,
    estimate,
    in_flight_microbatches,
    known_model_config,
    param_counts,
    parameter_shapes,
    parse_count,
    parse_size,
    plan,
    stage_layers,
)


@pytest.mark.parametrize("name", sorted(FLAVOURS))
def test_parameter_shapes_match_the_model(name):
    torch = pytest.importorskip("torch")
    from deepwhale.model.transformer import CausalLM

    config = flavour_config(name)
    with torch.device("meta"):
        model = CausalLM(config)
    real = {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert parameter_shapes(config) == real
    assert param_counts(config).total == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_are_counted_once():
    torch = pytest.importorskip("torch")
    from deepwhale.model.transformer import CausalLM

    config = flavour_config("debug-llama", tie_word_embeddings=True)
    counts = param_counts(config)
    assert counts.lm_head == 0
    assert counts.total == sum(p.numel() for p in CausalLM(config).parameters())
    del torch


def test_public_releases_match_their_published_sizes():
    # DeepSeek-V3 report: 671B total, 37B activated (36.6B without the embedding); V2: 236B/21B
    v3 = param_counts(known_model_config("deepseek-v3-671b"))
    assert round(v3.total / 1e9) == 671
    assert round(v3.active_matmul / 1e8) == 366
    v2 = param_counts(known_model_config("deepseek-v2-236b"))
    assert round(v2.total / 1e9) == 236 and round(v2.active / 1e9) == 21
    assert round(param_counts(known_model_config("deepseek-llm-7b")).total / 1e8) == 69
    assert round(param_counts(known_model_config("deepseek-llm-67b")).total / 1e8) == 674
    for name, spec in KNOWN_MODELS.items():
        assert spec["source"].startswith("https://huggingface.co/deepseek-ai/"), name


def test_active_params_of_a_dense_model_are_all_params():
    c = param_counts(flavour_config("debug-llama"))
    assert c.active == c.total and c.routed_experts == 0


def test_bubble_formulas():
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 8, "gpipe") == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, "1f1b") == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, "interleaved_1f1b") == pytest.approx(1.5 / 9.5)
    # Narayanan's (p-1)/m relative to the ideal time is the same bubble
    f = bubble_fraction(8, 32)
    assert f / (1 - f) == pytest.approx(7 / 32)
    with pytest.raises(PlanError):
        bubble_fraction(0, 8)


def test_in_flight_microbatches_per_schedule():
    assert in_flight_microbatches("gpipe", 4, 0, 16) == 16
    assert [in_flight_microbatches("1f1b", 4, r, 16) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches("1f1b", 4, 0, 2) == 2
    assert in_flight_microbatches("1f1b", 1, 0, 16) == 1
    assert in_flight_microbatches("interleaved_1f1b", 4, 0, 16) == (4 + 6 + 1) / 2
    assert [len(r) for r in stage_layers(61, 16)] == [4] * 13 + [3] * 3


def _est(name="debug-v3", **kw):
    layout = ParallelLayout(**{"dp": 1, **kw.pop("layout", {})})
    defaults = dict(micro_batch_size=2, seq_len=64, microbatches=4)
    return estimate(flavour_config(name), layout, **{**defaults, **kw})


def test_fsdp_shards_parameters_grads_and_optimizer_exactly():
    fp32 = dict(param_bytes=4, grad_bytes=4, optim_bytes_per_param=8, activation_bytes=4)
    one = _est("debug-llama", **fp32).memory
    n = param_counts(flavour_config("debug-llama")).total
    assert one.params == 4 * n and one.grads == 4 * n and one.optimizer == 8 * n
    shapes = parameter_shapes(flavour_config("debug-llama"))
    for shard in (2, 4):
        m = _est("debug-llama", layout={"dp_shard": shard}, **fp32).memory
        padded = sum(-(-s[0] // shard) * math.prod(s[1:]) for s in shapes.values())
        assert m.optimizer == 8 * padded and m.params == 4 * padded
        assert m.optimizer == pytest.approx(one.optimizer / shard, rel=0.01)
        assert m.fsdp_buffers > 0


def test_tensor_parallel_divides_attention_and_mlp_weights():
    config = flavour_config("debug-llama")
    one = _est("debug-llama").memory
    two = _est("debug-llama", layout={"tp": 2}).memory
    c = param_counts(config)
    replicated = c.norms  # only the RMSNorm weights stay whole on each TP rank
    assert two.params == 2 * ((c.total - replicated) // 2 + replicated)
    assert two.params < one.params
    assert two.activations < one.activations


def test_activation_checkpointing_and_pipeline_memory():
    no_ac = _est(microbatches=8)
    full = _est(microbatches=8, activation_checkpointing="full")
    assert full.memory.activations < no_ac.memory.activations
    assert full.memory.activations_no_ac == no_ac.memory.activations
    gpipe = _est(microbatches=8, layout={"pp": 2, "pp_schedule": "gpipe"})
    f1b = _est(microbatches=8, layout={"pp": 2, "pp_schedule": "1f1b"})
    assert gpipe.memory_by_stage[0].activations > f1b.memory_by_stage[0].activations
    assert gpipe.bubble_fraction == f1b.bubble_fraction == pytest.approx(1 / 9)


def test_ddp_all_reduce_bytes_are_all_grads_once_per_step():
    n = param_counts(flavour_config("debug-v3")).total
    est = _est(layout={"dp": 4}, grad_bytes=4, param_bytes=4)
    (ar,) = [c for c in est.comm if c.dim == "dp"]
    assert ar.op == "all_reduce" and ar.calls == 1 and ar.group_size == 4
    assert ar.payload_bytes == ar.output_bytes == 4 * n
    assert ar.wire_bytes == pytest.approx(2 * 3 / 4 * 4 * n)
    every = _est(layout={"dp": 4}, grad_bytes=4, ddp_sync_every_microbatch=True)
    assert every.comm_bytes("dp") == 4 * 4 * n


def test_fsdp_gathers_forward_and_backward_and_reduce_scatters():
    est = _est("debug-llama", layout={"dp_shard": 2}, param_bytes=4, grad_bytes=4, microbatches=1)
    by = {(c.op, c.what): c for c in est.comm if c.dim == "dp_shard"}
    shard = est.memory.params // 4
    # the root (embedding, final norm, lm_head) stays gathered from forward to backward
    root = (512 * 64 + 64 + 512 * 64) // 2
    assert by[("all_gather", "params fwd")].payload_bytes == 4 * shard
    assert by[("all_gather", "params bwd")].payload_bytes == 4 * (shard - root)
    assert by[("all_gather", "params fwd")].output_bytes == 2 * 4 * shard
    assert by[("reduce_scatter", "grads")].payload_bytes == 2 * 4 * shard


def test_tp_pp_ep_messages():
    c = flavour_config("debug-v3")
    msg = 2 * 64 * c.hidden_size * 2  # b * s * h * bf16
    tp = _est(layout={"tp": 2}, microbatches=1)
    ag = [x for x in tp.comm if x.dim == "tp" and x.op == "all_gather"][0]
    assert ag.calls == 4 * c.num_hidden_layers + 2  # 2 fwd + 2 bwd per layer, embedding, head
    assert ag.output_bytes == msg * ag.calls
    pp = _est(layout={"pp": 3}, microbatches=4)
    (send,) = [x for x in pp.comm if x.dim == "pp"]
    assert send.calls == 2 * 4 and send.payload_bytes == msg * 8  # a middle stage: fwd + bwd
    ep = _est(layout={"dp": 4, "ep": 4}, microbatches=1)
    (a2a,) = [x for x in ep.comm if x.dim == "ep"]
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    assert a2a.calls == 4 * moe_layers
    assert a2a.payload_bytes == 4 * moe_layers * 2 * 64 * c.num_experts_per_tok * c.hidden_size * 2


def test_check_layout_rejections_surface():
    with pytest.raises(LayoutError, match="tp=3"):
        _est(layout={"tp": 3})
    with pytest.raises(LayoutError, match="MoE"):
        _est("debug-llama", layout={"dp": 2, "ep": 2})
    with pytest.raises(LayoutError, match="resolved"):
        estimate(flavour_config("debug-v3"), ParallelLayout(), 1, 64)


def test_plan_ranks_fitting_layouts_and_reports_time():
    ranked = plan(flavour_config("debug-v3"), 8, 80 * 10**9, 989, 256, 2**16, nodes=2)
    assert ranked and all(x.fits for x in ranked)
    speeds = [x.estimate.tokens_per_s_per_gpu for x in ranked]
    assert speeds == sorted(speeds, reverse=True)
    for x in ranked:
        assert x.layout.world_size == 8 and x.layout.tp <= 4
        assert 0 < x.estimate.mfu and x.estimate.step_s > 0
    with pytest.raises(PlanError, match="no layout fits"):
        plan(flavour_config("debug-v3"), 8, 10**5, 989, 256, 2**16)
    with pytest.raises(PlanError, match="nodes"):
        plan(flavour_config("debug-v3"), 8, 10**9, 989, 256, 2**16, nodes=3)


def test_parse_sizes_and_counts():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("141 GB") == 141 * 10**9
    assert parse_count("4M") == 4 * 10**6
    assert parse_count("4096") == 4096
    assert parse_count("1.5k") == 1500
    for bad in ("80", "GB", "-1GB", "80XB"):
        with pytest.raises(PlanError):
            parse_size(bad)
    with pytest.raises(PlanError):
        parse_count("4q")


def test_planner_imports_no_torch():
    code = "import sys, deepwhale.parallel.planner, deepwhale.parallel.plan_cli; "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ARGS = ["plan", "--model", "debug-v3", "--gpus", "8", "--seq-len", "256"]
ARGS += ["--global-batch-tokens", "64k"]


def test_cli_table_and_json():
    from deepwhale.cli import app

    runner = CliRunner()
    result = runner.invoke(app, [*ARGS, "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "tok/s/GPU" in result.output and "debug-v3" in result.output
    result = runner.invoke(app, [*ARGS, "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["candidates"]) == 2
    first = data["candidates"][0]
    assert set(first["layout"]) == {"dp", "dp_shard", "tp", "pp", "ep", "pp_schedule"}
    assert first["memory_bytes"]["total"] > 0 and first["tokens_per_s_per_gpu"] > 0
    assert data["params"]["total"] == param_counts(flavour_config("debug-v3")).total


@pytest.mark.parametrize(
    "extra",
    [
        ["--model", "no-such-model"],
        ["--gpus", "0"],
        ["--gpus", "two"],
        ["--gpu-mem", "80"],
        ["--gpu-mem", "1KB"],
        ["--global-batch-tokens", "lots"],
        ["--nodes", "3"],
    ],
)
def test_cli_bad_input_prints_one_error_line(extra):
    from deepwhale.cli import app

    result = CliRunner().invoke(app, [*ARGS, *extra])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_estimate_fields_are_plain_data():
    est = _est(layout={"dp": 2, "dp_shard": 2, "ep": 2})
    d = dataclasses.asdict(est)
    assert {"memory", "comm", "bubble_fraction", "model_flops"} <= set(d)
    assert est.step_s is None  # no hardware given


def test_cli_prints_a_train_command_for_the_top_layout(tmp_path):
    from deepwhale.cli import app
    from deepwhale.parallel.layout import parse_layout
    from deepwhale.train.config import load_config

    runner = CliRunner()
    args = [*ARGS, "--activation-checkpointing", "full", "--top", "1"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    line = next(x for x in table.output.splitlines() if x.startswith("run #1: "))
    best = json.loads(runner.invoke(app, [*args, "--json"]).output)["candidates"][0]
    words = line.split()
    assert words[2:4] == ["torchrun", "--nproc-per-node"] and words[4] == "8"
    degrees = parse_layout(words[words.index("--parallel") + 1])
    assert {k: v for k, v in best["layout"].items() if k != "pp_schedule" and v > 1} == degrees
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert "train.activation_checkpointing=full" in sets
    # the command's overrides are valid train config keys
    extra = [f"parallel.{k}={v}" for k, v in degrees.items()] + sets
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.path=x.txt", *extra])
    assert cfg.train.activation_checkpointing == "full"
