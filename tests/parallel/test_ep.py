"""Expert parallelism (deepwhale.parallel.ep) against the single-process model.

Each test spawns ``P`` gloo processes on 127.0.0.1. Every process builds the same seeded model,
runs the single-process reference on the whole batch (4 sequences x 32 tokens) itself, then an
expert-parallel copy on its own sequences, and compares logits, router outputs, RouterMonitor
statistics and gradients. A failed assertion in a worker fails the test with the worker's
traceback; a process-group timeout and a wall-clock deadline keep a hang from blocking the suite.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from deepwhale.model.flavours import flavour_config
from deepwhale.model.moe import Gate, MoE
from deepwhale.model.transformer import CausalLM
from deepwhale.parallel.ep import (
    EPMoE,
    all_to_all_rows,
    apply_expert_parallel,
    expert_parameter_names,
    full_state_dict,
    local_expert_range,
)
from deepwhale.train.moe import RouterMonitor

BATCH, SEQ = 4, 32
TOL = dict(rtol=1e-5, atol=1e-6)
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases: list[dict], deadline_s: float = 150.0) -> None:
    """Run :func:`_worker` on ``world`` processes; raise a worker's error, or on the deadline."""
    ctx = mp.start_processes(
        _worker, args=(world, _free_port(), cases), nprocs=world, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"expert-parallel workers still running after {deadline_s} s")


def _worker(rank: int, world: int, port: int, cases: list[dict]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        for case in cases:
            globals()[case.pop("check")](rank, world, **case)
    finally:
        dist.destroy_process_group()


def _capture_indices(model) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for g in model.modules():
        if isinstance(g, Gate):
            g.register_forward_hook(lambda m, a, o: out.append(o[1]))
    return out


def _check_equivalence(rank: int, world: int, flavour: str, skew: bool = False) -> None:
    """Logits, router indices, aux loss, loads and gradients of EP vs one process."""
    cfg = flavour_config(flavour)
    ref = CausalLM(cfg)
    ref.init_weights(generator=torch.Generator().manual_seed(0))
    n_exp, per = cfg.n_routed_experts, cfg.n_routed_experts // world
    if skew:  # steer every token to rank 0's experts: the other ranks receive no rows at all
        for g in ref.modules():
            if isinstance(g, Gate):
                g.e_score_correction_bias.copy_((torch.arange(n_exp) < per).float() * 2 - 1)
    ep = copy.deepcopy(ref)
    apply_expert_parallel(ep, dist.group.WORLD)

    ids = torch.randint(
        0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)
    )
    x, y = ids[:, :-1], ids[:, 1:]
    b = BATCH // world
    rows = slice(rank * b, (rank + 1) * b)
    tokens = slice(rank * b * SEQ, (rank + 1) * b * SEQ)

    # the single-process reference on all sequences
    ref_mon, ref_idx = RouterMonitor(ref), _capture_indices(ref)
    ref_logits = ref(x)
    loss = F.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
    loss.backward()

    # the expert-parallel run on this rank's sequences, loss normalised by all tokens
    ep_mon, ep_idx = RouterMonitor(ep), _capture_indices(ep)
    logits = ep(x[rows])
    loss_r = F.cross_entropy(logits.flatten(0, 1), y[rows].flatten(), reduction="sum") / y.numel()
    loss_r.backward()
    ep_aux = ep_mon.aux_loss(torch.ones(b, SEQ, dtype=torch.bool), alpha=1.0, seq_aux=True)
    ep_mon.add_loads(torch.ones(b, SEQ, dtype=torch.bool))

    # structure: only local experts, single-device names, full state dict gathers back
    moes = [m for m in ep.modules() if isinstance(m, MoE)]
    assert moes and all(isinstance(m, EPMoE) for m in moes)
    for m in moes:
        assert list(m.experts) == [str(j) for j in local_expert_range(n_exp, world, rank)]
    ref_sd = ref.state_dict()
    assert set(ep.state_dict()) < set(ref_sd)
    full = full_state_dict(ep)
    assert list(full) == list(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(full[k], v), k

    # (a) logits, also without autograd
    torch.testing.assert_close(logits, ref_logits[rows], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ep(x[rows]), ref_logits[rows], **TOL)

    # (c) router outputs, and RouterMonitor's statistics of the training forward
    n_layers = len(moes)
    assert len(ep_idx) == 2 * n_layers and len(ref_idx) == n_layers  # EP ran forward twice
    for mine, theirs in zip(ep_idx[:n_layers], ref_idx, strict=True):
        assert torch.equal(mine, theirs[tokens])
        if skew:
            assert int(theirs.max()) < per
    mask_r = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask_r[rows] = True  # seq_aux sums per-sequence terms: this rank's share of the reference's
    torch.testing.assert_close(ep_aux, ref_mon.aux_loss(mask_r, alpha=1.0, seq_aux=True), **TOL)
    ref_mon.add_loads(torch.ones(BATCH, SEQ, dtype=torch.bool))
    for mine, theirs in zip(ep_mon.loads, ref_mon.loads, strict=True):
        dist.all_reduce(mine)
        assert torch.equal(mine, theirs)

    # (b) gradients: replicated ones summed over the group, local experts' as they are
    experts = expert_parameter_names(ep)
    ref_params = dict(ref.named_parameters())
    n_none = 0
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if name in experts:
            if want is None:  # an expert nobody routed to: untouched, as on one device
                assert p.grad is None, name
                n_none += 1
            else:
                torch.testing.assert_close(p.grad, want, **TOL, msg=name)
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, want, **TOL, msg=name)
    if skew and rank > 0:
        assert n_none == len(experts)  # received no rows, ran no expert, and did not hang


def _check_errors(rank: int, world: int) -> None:
    """Misuse raises; the all-to-all helper moves uneven and empty row blocks both ways."""
    dense = CausalLM(flavour_config("debug-llama"))
    with pytest.raises(ValueError, match="no MoE"):
        apply_expert_parallel(dense, None)
    moe = CausalLM(flavour_config("debug-v3"))
    apply_expert_parallel(moe)
    with pytest.raises(ValueError, match="already"):
        apply_expert_parallel(moe)
    odd = CausalLM(
        flavour_config("debug-v3", n_routed_experts=world * 4 + 1, n_group=1, topk_group=1)
    )
    with pytest.raises(ValueError, match="divide"):
        apply_expert_parallel(odd)
    # rank s sends s + d rows to rank d (rank 0 sends none to rank 0)
    send = [rank + d for d in range(world)]
    recv = [s + rank for s in range(world)]
    xs = torch.full((sum(send), 3), float(rank), requires_grad=True)
    out = all_to_all_rows(xs, recv, send)
    want = torch.cat([torch.full((n, 3), float(s)) for s, n in enumerate(recv)])
    assert torch.equal(out, want)
    (out * (rank + 1)).sum().backward()
    want_grad = torch.cat([torch.full((n, 3), float(d + 1)) for d, n in enumerate(send)])
    assert torch.equal(xs.grad, want_grad)


def test_local_expert_range():
    assert local_expert_range(8, 2, 1) == range(4, 8)
    assert local_expert_range(8, 4, 0) == range(0, 2)
    assert local_expert_range(8, 1, 0) == range(0, 8)
    with pytest.raises(ValueError, match="divide"):
        local_expert_range(8, 3, 0)
    with pytest.raises(ValueError, match="ep_rank"):
        local_expert_range(8, 2, 2)
    with pytest.raises(ValueError, match="ep_size"):
        local_expert_range(8, 0, 0)


def test_apply_needs_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised"):
        apply_expert_parallel(CausalLM(flavour_config("debug-v3")))


@pytest.fixture
def one_thread(monkeypatch):
    """Spawned workers: one OpenMP thread each (2 shared cores) and this checkout first on the path."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )


def test_ep2_matches_single_process(one_thread):
    """ep=2: debug-v3 (sigmoid noaux_tc), debug-v2 (softmax group_limited_greedy), and debug-v3
    with every token steered to rank 0's experts (rank 1 receives nothing)."""
    _spawn(
        2,
        [
            dict(check="_check_errors"),
            dict(check="_check_equivalence", flavour="debug-v3"),
            dict(check="_check_equivalence", flavour="debug-v2"),
            dict(check="_check_equivalence", flavour="debug-v3", skew=True),
        ],
    )


@pytest.mark.slow
def test_ep4_matches_single_process(one_thread):
    """ep=4 on 4 processes: 2 experts and 1 sequence per rank."""
    _spawn(
        4,
        [
            dict(check="_check_equivalence", flavour="debug-v3"),
            dict(check="_check_equivalence", flavour="debug-v3", skew=True),
        ],
    )
