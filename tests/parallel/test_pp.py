"""Pipeline parallelism (deepwhale.parallel.pp): stage cuts, state-dict keys, and equivalence of
GPipe / 1F1B / interleaved 1F1B with the single-process step.

The equivalence tests start 2 gloo processes (pp=2), each building the same seeded model, and feed
windows of 8 x 32 random tokens (~20 % of labels -100) in 4 microbatches. On every one of 3 AdamW
steps the pipeline's summed microbatch loss must equal the single-process window mean token loss
to 1e-5 relative and every local parameter's gradient the single-process gradient (by FQN, to
1e-5 relative / 1e-6 absolute); a forward-only validation pass after the first step must give the
single-process validation loss without touching gradients; after the 3 steps the weights must
agree to 1e-5.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import deepwhale
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from deepwhale.parallel.layout import LayoutError, ParallelLayout
from deepwhale.parallel.pp import (
    WindowTokenLoss,
    build_pipeline,
    build_stage_module,
    pipeline_step,
    stage_layer_ranges,
)

B, T, N_MB, STEPS = 8, 32, 4, 3
LLAMA4 = {"num_hidden_layers": 4}
# Adam divides by sqrt(v) + eps: with the default eps=1e-8 an entry whose gradient is ~1e-8 (rows
# of rarely used tokens) turns a 1e-10 rounding difference between the pipeline's microbatched
# sums and the single-process sum into a ~1e-5 weight difference after a few steps. eps=1e-6
# bounds that gain at lr/eps = 1e3, so the weight check tests the pipeline, not Adam's
# conditioning (gradients are compared at every step, to 1e-6).
ADAMW = dict(lr=1e-3, weight_decay=0.1, eps=1e-6)


def make_model(flavour: str, **overrides) -> CausalLM:
    model = CausalLM(flavour_config(flavour, **overrides))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    return model


def make_batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed ``(B, T)`` window of random ids and labels, ~20 % of labels -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.2] = -100
    return ids, labels


# ---------------------------------------------------------------------------- single process
@pytest.mark.parametrize(
    "n_layers,n_stages,counts",
    [
        (2, 1, [2]),
        (2, 2, [1, 1]),
        (3, 2, [2, 1]),  # extra layer: first stage before the last (lm_head + loss)
        (4, 4, [1, 1, 1, 1]),
        (7, 3, [2, 3, 2]),  # interior stage first
        (10, 4, [2, 3, 3, 2]),
        (11, 4, [3, 3, 3, 2]),
        (61, 8, [7, 8, 8, 8, 8, 8, 7, 7]),
    ],
)
def test_stage_layer_ranges(n_layers, n_stages, counts):
    ranges = stage_layer_ranges(n_layers, n_stages)
    assert [len(r) for r in ranges] == counts
    assert [i for r in ranges for i in r] == list(range(n_layers))  # contiguous, in order
    assert ranges == stage_layer_ranges(n_layers, n_stages)  # deterministic


@pytest.mark.parametrize("n_layers,n_stages", [(1, 2), (3, 4), (3, 0), (3, -1)])
def test_stage_layer_ranges_rejects(n_layers, n_stages):
    with pytest.raises(ValueError, match="stage"):
        stage_layer_ranges(n_layers, n_stages)


@pytest.mark.parametrize(
    "flavour,overrides,n_stages",
    [
        ("debug-llama", {}, 1),
        ("debug-llama", {}, 2),
        ("debug-v3", {}, 2),
        ("debug-v3", {}, 3),
        ("debug-llama", LLAMA4, 4),
    ],
)
def test_stage_keys_partition_the_full_state_dict(flavour, overrides, n_stages):
    model = make_model(flavour, **overrides)
    full = model.state_dict()
    keys = []
    for s in range(n_stages):
        stage = build_stage_module(model, s, n_stages)
        sd = stage.state_dict()
        for k, v in sd.items():
            assert v.data_ptr() == full[k].data_ptr(), k  # shared, not copied
        keys += list(sd)
    assert len(keys) == len(set(keys))  # no duplicates
    assert set(keys) == set(full)  # none missing, none extra
    first, last = (
        build_stage_module(model, 0, n_stages),
        build_stage_module(model, n_stages - 1, n_stages),
    )
    assert "model.embed_tokens.weight" in first.state_dict()
    assert {"model.norm.weight", "lm_head.weight"} <= set(last.state_dict())
    assert not any("rotary_emb" in k for k in keys)  # inv_freq is non-persistent


@pytest.mark.parametrize(
    "flavour,overrides,n_stages",
    [("debug-llama", {}, 2), ("debug-v3", {}, 3), ("debug-llama", LLAMA4, 4)],
)
def test_chained_stages_equal_the_full_forward(flavour, overrides, n_stages):
    model = make_model(flavour, **overrides).eval()
    ids, _ = make_batch(model.config.vocab_size, seed=1)
    x = ids
    with torch.no_grad():
        for s in range(n_stages):
            x = build_stage_module(model, s, n_stages)(x)
            want = (
                B,
                T,
                model.config.vocab_size if s == n_stages - 1 else model.config.hidden_size,
            )
            assert x.shape == want
        torch.testing.assert_close(x, model(ids), rtol=1e-6, atol=1e-6)


def test_stage_errors():
    model = make_model("debug-llama")
    with pytest.raises(ValueError, match="stage_idx"):
        build_stage_module(model, 2, 2)
    with pytest.raises(ValueError, match="at least one decoder layer"):
        build_stage_module(model, 0, 3)
    with pytest.raises(ValueError, match="token ids"):
        build_stage_module(model, 0, 2)(torch.tensor([[0, 512]]))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        build_stage_module(make_model("debug-llama", tie_word_embeddings=True), 0, 2)
    stage = build_stage_module(model, 1, 2)
    with pytest.raises(ValueError, match="input_ids"):
        pipeline_step(None, [build_stage_module(model, 0, 2)], labels=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="labels"):
        pipeline_step(None, [stage], input_ids=torch.zeros(1, 1))


def test_window_token_loss():
    loss = WindowTokenLoss()
    labels = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    assert loss.window(labels) == 3 and loss.denom == 3.0
    assert loss.window(torch.full((2, 3), -100)) == 1  # an all-padding window: zero loss
    logits = torch.randn(2, 3, 8)
    assert loss(logits, torch.full((2, 3), -100)).item() == 0.0


# ---------------------------------------------------------------------------- two processes
def _reference(flavour, overrides):
    """Single-process run: per-step losses and grads, the validation loss after the first step,
    and the weights after STEPS AdamW steps."""
    model = make_model(flavour, **overrides)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    loss_fn = WindowTokenLoss()
    out = {"loss": [], "grads": []}
    for step in range(STEPS):
        if step == 1:
            ids, labels = make_batch(model.config.vocab_size, seed=999)
            with torch.no_grad():
                loss_fn.window(labels)
                out["eval"] = loss_fn(model(ids), labels).item()
        ids, labels = make_batch(model.config.vocab_size, seed=100 + step)
        opt.zero_grad(set_to_none=True)
        loss_fn.window(labels)
        loss = loss_fn(model(ids), labels)
        loss.backward()
        out["loss"].append(loss.item())
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    out["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _close(a, b, what: str) -> None:
    """``|a - b| <= 1e-5 |b|`` for two losses (floats)."""
    assert abs(a - b) <= 1e-5 * abs(b), f"{what}: pipeline {a!r} vs single process {b!r}"


def _check_case(flavour, overrides, schedule, static, via_mesh):
    """One pipeline run on this rank against the single-process reference (see module doc)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    ref = _reference(flavour, overrides)
    model = make_model(flavour, **overrides)
    loss_fn = WindowTokenLoss()
    layout = ParallelLayout(pp=2, pp_schedule=schedule)
    group = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",)) if via_mesh else dist.group.WORLD
    shape = (B, T) if static else None
    mods, sched = build_pipeline(model, group, layout, "cpu", loss_fn, N_MB, batch_shape=shape)
    looped = schedule == "interleaved_1f1b"
    assert [m.stage_idx for m in mods] == ([rank, rank + 2] if looped else [rank])
    calls = {}  # MoE gates inside the stages keep their forward hooks working
    for m in mods:
        for name, sub in m.named_modules():
            if name.endswith("mlp.gate"):
                calls[name] = 0
                sub.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    params = [p for m in mods for p in m.parameters()]
    opt = torch.optim.AdamW(params, **ADAMW)
    last = any(m.is_last for m in mods)
    tag = f"{flavour} {schedule} rank {rank}"
    for step in range(STEPS):
        if step == 1:  # validation between steps: forward only, and training resumes after it
            opt.zero_grad(set_to_none=True)
            ids, labels = make_batch(model.config.vocab_size, seed=999)
            loss_fn.window(labels)
            loss = pipeline_step(sched, mods, ids, labels, train=False)
            if last:
                _close(loss.item(), ref["eval"], f"{tag} eval")
            assert all(p.grad is None for p in params), tag
        ids, labels = make_batch(model.config.vocab_size, seed=100 + step)
        opt.zero_grad(set_to_none=True)
        loss_fn.window(labels)
        loss = pipeline_step(sched, mods, ids, labels)
        if last:
            _close(loss.item(), ref["loss"][step], f"{tag} step {step} loss")
        else:
            assert loss is None
        for m in mods:
            for n, p in m.named_parameters():
                torch.testing.assert_close(
                    p.grad,
                    ref["grads"][step][n],
                    rtol=1e-5,
                    atol=1e-6,
                    msg=lambda e, n=n, step=step: f"{tag} step {step} grad {n}: {e}",
                )
        opt.step()
    for m in mods:
        for k, v in m.state_dict().items():
            torch.testing.assert_close(
                v, ref["weights"][k], rtol=1e-5, atol=1e-5, msg=lambda e, k=k: f"{tag} {k}: {e}"
            )
    # forward passes per gate: STEPS training windows + 1 validation window, N_MB each
    assert all(c == (STEPS + 1) * N_MB for c in calls.values()), (tag, calls)
    assert bool(calls) == (flavour == "debug-v3"), tag


def _worker(rank, world, port, cases, package_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    assert deepwhale.__file__ == package_file  # the worktree's package, not another install
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group, loss = dist.group.WORLD, WindowTokenLoss()
        with pytest.raises(LayoutError, match="pp=4"):
            build_pipeline(make_model("debug-llama"), group, ParallelLayout(pp=4), "cpu", loss, 4)
        with pytest.raises(LayoutError, match="equal microbatches"):
            build_pipeline(
                make_model("debug-llama"), group, ParallelLayout(pp=2), "cpu", loss, 4, (7, T)
            )
        with pytest.raises(ValueError, match="loss_fn"):
            build_pipeline(make_model("debug-llama"), group, ParallelLayout(pp=2), "cpu", None, 4)
        for case in cases:
            _check_case(*case)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cases, timeout_s: float = 240.0) -> None:
    """Run ``cases`` on 2 gloo processes; a failure in either raises here, a hang is killed."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(
        _worker,
        args=(2, _free_port(), cases, deepwhale.__file__),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"pipeline workers still running after {timeout_s} s")


def test_gpipe_and_1f1b_match_single_process_llama():
    # gpipe with static stage metadata (batch_shape), 1f1b with torch's shape inference
    _spawn([("debug-llama", {}, "gpipe", True, False), ("debug-llama", {}, "1f1b", False, False)])


@pytest.mark.slow
def test_gpipe_and_1f1b_match_single_process_v3_moe():
    _spawn([("debug-v3", {}, "gpipe", True, False), ("debug-v3", {}, "1f1b", True, False)])


@pytest.mark.slow
def test_interleaved_1f1b_matches_single_process():
    # the pp group given as a 1-D DeviceMesh
    _spawn([("debug-llama", LLAMA4, "interleaved_1f1b", True, True)])
