"""Gradient compression hooks (deepwhale.parallel.compression) on real gloo process groups.

Multi-rank checks run in one spawned group per world size (starting processes costs more than
the checks); each worker saves its findings and the test asserts on them here.
"""

from __future__ import annotations

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from deepwhale.parallel import compression as C
from deepwhale.parallel.layout import GradCompression, LayoutError, ParallelLayout

SPAWN_TIMEOUT_S = 120
CASES = ((False, 0.1), (True, 0.1), (False, 0.01))  # (momentum_correction, ratio)


# ------------------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn_name):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(seconds=60),
    )
    try:
        result = globals()[fn_name](rank, world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn_name: str, world: int, tmp_path) -> list[dict]:
    """Run worker ``fn_name(rank, world) -> dict`` on ``world`` gloo ranks; a hung or failed
    rank fails the test within SPAWN_TIMEOUT_S instead of hanging it."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the children read it at start
    ctx = mp.start_processes(
        _entry,
        args=(world, _free_port(), str(tmp_path), fn_name),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn_name} on {world} ranks did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -------------------------------------------------------------------------------- model & data
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 16, generator=g)
    return x, x[:, :8] * 0.5 - x[:, 8:].sum(1, keepdim=True) * 0.1  # learnable target


def _ddp(model: torch.nn.Module) -> DDP:
    # 1 KiB buckets: the first iteration runs all 808 parameters in one bucket, then DDP
    # rebuilds in gradient-ready order into [2.bias, 2.weight] (264) and [0.bias, 0.weight] (544)
    return DDP(model, bucket_cap_mb=1 / 1024)


def _train(cfg, steps, rank, start=0, ddp=None, state=None, opt=None):
    """``steps`` SGD steps; returns (ddp, state, opt, losses, per-step payload bytes)."""
    if ddp is None:
        ddp = _ddp(_model())
        state = C.register_compression(ddp, cfg)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses, sent = [], []
    for step in range(start, start + steps):
        if state is not None:
            state.set_step(step)
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sent.append(state.bytes_sent_step if state is not None else 0)
    return ddp, state, opt, losses, sent


def _params(ddp) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ddp.module.parameters()]


# -------------------------------------------------------------------------------------- workers
def _worker_dense_parity(rank, world):
    """ratio=1 (k = N every step) against DDP without a hook, same data."""
    out = {}
    cfg = GradCompression(method="topk", ratio=1.0, warmup_steps=0, momentum_correction=False)
    plain, _, _, plain_losses, _ = _train(GradCompression(), 3, rank)
    hooked, state, _, hooked_losses, _ = _train(cfg, 3, rank)
    out["params"] = (_params(plain), _params(hooked))
    out["losses"] = (plain_losses, hooked_losses)
    out["dense_steps"] = state.dense_steps
    out["bytes"] = (state.bytes_sent_total, state.dense_bytes_total)
    return out


def _worker_topk(rank, world):
    out = {}
    # (2) mass conservation inside a real run, plain error feedback and momentum correction
    # ratio 0.1 sends positions as a bitmap, 0.01 as int32 (see C.use_bitmap)
    for mc, ratio in CASES:
        scope = "tensor" if mc else "bucket"
        cfg = GradCompression(
            method="topk", ratio=ratio, warmup_steps=0, momentum_correction=mc, topk_scope=scope
        )
        ddp = _ddp(_model())
        names = {id(p): n for n, p in ddp.module.named_parameters()}
        state = C.TopKState(cfg, names)
        records = []

        def probe(state, bucket, records=records, cfg=cfg):
            grad = bucket.buffer().clone()
            before = {k: v.clone() for k, v in state.bucket_tensors(bucket).items()}
            fut = C.topk_hook(state, bucket)
            after = {k: v.clone() for k, v in state.bucket_tensors(bucket).items()}
            rec = {"grad": grad, "before": before, "after": after}
            rec["sent"] = state.last_sent[bucket.index()]
            records.append(rec)
            params = bucket.parameters()

            def done(f, rec=rec, params=params):
                rec["result"] = f.value().clone()
                rec["mask"] = torch.cat([state.sent_mask[p].reshape(-1) for p in params])
                return f.value()

            return fut.then(done)

        ddp.register_comm_hook(state, probe)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        _train(cfg, 3, rank, ddp=ddp, state=state, opt=opt)
        conserved, averaged = True, True
        for rec in records:
            n = rec["grad"].numel()
            values, indices = rec["sent"]
            sent = torch.zeros(n).index_put_((indices.long(),), values)
            if mc:
                u = rec["before"]["momentum"] * cfg.momentum + rec["grad"]
                acc = rec["before"]["residual"] + u
                conserved &= torch.equal(
                    rec["after"]["momentum"][indices.long()], torch.zeros(len(indices))
                )
            else:
                acc = rec["before"]["residual"] + rec["grad"]
            conserved &= torch.equal(sent + rec["after"]["residual"], acc)
            conserved &= torch.count_nonzero(rec["after"]["residual"][indices.long()]).item() == 0
            everyone = [torch.empty_like(sent) for _ in range(world)]
            dist.all_gather(everyone, sent)
            total = torch.zeros(n)
            for s in everyone:
                total += s
            averaged &= torch.equal(rec["result"], total / world)
            # the sent mask the gap-aware step reads: the union of every rank's positions
            mine = torch.zeros(n, dtype=torch.uint8)
            mine[indices.long()] = 1
            masks = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(masks, mine)
            averaged &= torch.equal(rec["mask"], torch.stack(masks).amax(0).bool())
        out[f"conserved_{mc}_{ratio}"] = conserved
        out[f"averaged_{mc}_{ratio}"] = averaged
        out[f"bucket_sizes_{mc}_{ratio}"] = [r["grad"].numel() for r in records]

    # (3) reproducible and (4) bytes, with warm-up
    cfg = GradCompression(method="topk", ratio=0.01, warmup_steps=2, momentum_correction=True)
    runs = [_train(cfg, 4, rank) for _ in range(2)]
    out["repro"] = all(
        torch.equal(a, b) for a, b in zip(_params(runs[0][0]), _params(runs[1][0]), strict=True)
    )
    out["sent_per_step"] = runs[0][4]
    state = runs[0][1]
    out["dense_step_bytes"] = state.dense_bytes_step
    out["wire_step"] = (state.wire_bytes_step, state.dense_wire_bytes_step)
    out["dense_steps"] = state.dense_steps
    out["bucket_numels"] = [sum(n for _, n in sig) for sig, _ in state.residual.meta.values()]

    # (6) state_dict round trip: 3 steps + checkpoint + fresh DDP + 3 steps == 6 steps
    cfg = GradCompression(method="topk", ratio=0.1, warmup_steps=2, momentum_correction=True)
    out["resume_topk"] = _resume_matches(cfg, rank)
    return out


def _resume_matches(cfg, rank) -> bool:
    whole = _train(cfg, 6, rank)[0]
    ddp, state, opt, _, _ = _train(cfg, 3, rank)
    ckpt = {
        "model": {k: v.clone() for k, v in ddp.module.state_dict().items()},
        "opt": opt.state_dict(),
        "comp": state.state_dict(),
    }
    model = _model()
    model.load_state_dict(ckpt["model"])
    ddp2 = _ddp(model)
    state2 = C.register_compression(ddp2, cfg)
    state2.load_state_dict(ckpt["comp"])
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    opt2.load_state_dict(ckpt["opt"])
    resumed = _train(cfg, 3, rank, start=3, ddp=ddp2, state=state2, opt=opt2)[0]
    return all(torch.equal(a, b) for a, b in zip(_params(whole), _params(resumed), strict=True))


def _worker_powersgd(rank, world):
    out = {}
    cfg = GradCompression(method="powersgd", powersgd_rank=2, warmup_steps=2)
    ddp, state, _, losses, sent = _train(cfg, 12, rank)
    out["losses"] = losses
    out["sent"] = sent
    out["dense_steps"] = state.dense_steps
    out["step_bytes"] = (state.bytes_sent_step, state.dense_bytes_step)
    # our P/Q estimate against the memories torch allocated (warm start keeps them)
    p = sum(t.numel() for t in state.psgd.p_memory_dict.values())
    q = sum(t.numel() for t in state.psgd.q_memory_dict.values())
    out["torch_pq_bytes"] = (p + q) * 4
    out["resume_powersgd"] = _resume_matches(cfg, rank)
    return out


def _worker_local_clip(rank, world):
    """DGC local clipping: every rank scales its whole gradient to norm <= clip / sqrt(W) before
    compression. At ratio 1 the result must be the average of the clipped local gradients;
    step 1 runs on DDP's rebuilt two buckets, so the first one waits for the second."""
    import copy

    clip = 0.05
    cfg = GradCompression(
        method="topk", ratio=1.0, warmup_steps=0, momentum_correction=False, local_grad_clip=clip
    )
    ddp = _ddp(_model())
    state = C.register_compression(ddp, cfg)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    out = {"match": [], "clip": [], "sparse_finite": None}
    for step in range(3):
        state.set_step(step)
        ref = copy.deepcopy(ddp.module)
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        hooked = [p.grad.clone() for p in ddp.module.parameters()]
        torch.nn.functional.mse_loss(ref(x), y).backward()
        local = [p.grad for p in ref.parameters()]
        norm = math.sqrt(sum(g.double().square().sum().item() for g in local))
        coef = min(1.0, clip / math.sqrt(world) / (norm + 1e-6))
        want = []
        for g in local:
            t = g * coef
            dist.all_reduce(t)
            want.append(t / world)
        out["match"].append(
            all(
                torch.allclose(a, b, rtol=1e-5, atol=1e-8)
                for a, b in zip(hooked, want, strict=True)
            )
        )
        out["clip"].append((state.last_clip, coef, norm))
        opt.step()
    sparse = GradCompression(
        method="topk", ratio=0.1, warmup_steps=0, momentum_correction=False, local_grad_clip=clip
    )
    _, st, _, losses, _ = _train(sparse, 3, rank)
    out["sparse_finite"] = all(math.isfinite(v) for v in losses) and st.last_clip[2] == 2
    return out


def _worker_two(rank, world):
    """Every two-rank check in one process group (starting processes is the slow part)."""
    return {
        "dense_parity": _worker_dense_parity(rank, world),
        "topk": _worker_topk(rank, world),
        "powersgd": _worker_powersgd(rank, world),
        "local_clip": _worker_local_clip(rank, world),
    }


def _worker_three(rank, world):
    cfg = GradCompression(method="topk", ratio=1.0, warmup_steps=0, momentum_correction=False)
    plain = _train(GradCompression(), 2, rank)[0]
    hooked = _train(cfg, 2, rank)[0]
    sparse_cfg = GradCompression(method="topk", ratio=0.05, warmup_steps=0)
    _, state, _, losses, _ = _train(sparse_cfg, 3, rank)
    return {
        "close": all(
            torch.allclose(a, b, rtol=1e-6, atol=1e-7)
            for a, b in zip(_params(plain), _params(hooked), strict=True)
        ),
        "sparse_losses": losses,
        "wire": (state.wire_bytes_step, state.bytes_sent_step),
    }


# -------------------------------------------------------------------------------- pure tests
def test_topk_compress_conserves_mass_bitwise():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (10, 3), (1000, 10), (4097, 4097)]:
        acc = torch.randn(n, generator=g) * torch.logspace(-8, 8, n)
        before = acc.clone()
        values, indices, residual = C.topk_compress(acc, k)
        assert torch.equal(acc, before)  # input untouched
        assert values.shape == (k,) and indices.dtype == torch.int32
        assert torch.equal(residual.index_put((indices.long(),), values), acc)
        assert torch.unique(indices).numel() == k
        if k < n:
            assert values.abs().min() >= residual.abs().max()
    with pytest.raises(ValueError):
        C.topk_compress(torch.zeros(4), 5)
    with pytest.raises(ValueError):
        C.topk_compress(torch.zeros(2, 2), 1)


def test_warmup_density_schedule():
    cfg = GradCompression(method="topk", ratio=0.01, warmup_steps=4)
    got = [C.topk_density(s, cfg) for s in range(7)]
    want = [1.0, 0.01**0.25, 0.1, 0.01**0.75, 0.01, 0.01, 0.01]
    assert got == pytest.approx(want, rel=1e-12)
    assert C.topk_density(0, GradCompression(method="topk", ratio=0.05, warmup_steps=0)) == 0.05
    assert [C.topk_k(1000, d) for d in got[:5]] == [1000, 317, 100, 32, 10]
    assert C.topk_k(100, 0.07) == 7  # not 8 from 7.000000000000001
    assert C.topk_k(10, 1e-9) == 1
    with pytest.raises(ValueError):
        C.topk_density(-1, cfg)


def test_byte_formulas_and_world_size_crossover():
    n, r = 1_000_000, 0.01
    k = C.topk_k(n, r)
    payload, wire = C.sparse_allgather_bytes(k, 4, 4, world=2)
    dense_payload, dense_wire = C.dense_allreduce_bytes(n, 4, world=2)
    assert payload == k * (4 + 4) == 80_000
    assert dense_payload == 4 * n and dense_wire == 4 * n  # 2 (W-1)/W = 1 at W=2
    assert payload < 0.3 * dense_payload
    # sparse/dense wire = W * r * (b_v + b_i) / (2 b_v): crossover at W = 1/r for fp32 + int32
    for world in (50, 99, 101, 200):
        sparse = C.sparse_allgather_bytes(k, 4, 4, world)[1]
        dense = C.dense_allreduce_bytes(n, 4, world)[1]
        assert (sparse > dense) == (world > 1 / r)
        assert sparse / dense == pytest.approx(world * r)
    assert C.index_dtype(2**31 - 1) == torch.int32 and C.index_dtype(2**31) == torch.int64


def test_powersgd_plan_matches_torch_rule():
    shapes = [torch.Size([32, 16]), torch.Size([32]), torch.Size([8, 32]), torch.Size([32, 16])]
    uncompressed, plan = C.powersgd_plan(shapes, rank=2)
    assert uncompressed == 32  # the bias
    assert [pos for pos, *_ in plan] == [0, 3, 2]  # grouped by shape, first appearance
    assert [(n, m, r) for _, n, m, r in plan] == [(32, 16, 2), (32, 16, 2), (8, 32, 2)]


def test_check_compression_supported_messages():
    topk = GradCompression(method="topk")
    C.check_compression_supported(topk, ParallelLayout(dp=4))
    C.check_compression_supported(GradCompression(), ParallelLayout(dp=1, dp_shard=2, tp=2))
    cases = {
        "dp_shard=2 (FSDP2 reduce-scatters inside fully_shard, no comm hook)": dict(dp_shard=2),
        "tp=2 (tensor-parallel": dict(tp=2),
        "pp=2 (pipeline stages": dict(pp=2),
        "ep=2 (expert-parallel": dict(ep=2),
    }
    for text, degrees in cases.items():
        with pytest.raises(LayoutError) as err:
            C.check_compression_supported(topk, ParallelLayout(dp=2, **degrees))
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(
            "parallel.grad_compression=topk works with DDP (dp) only; it cannot be combined with "
        )
        assert text in msg
    with pytest.raises(LayoutError, match=r"powersgd .* tp=2 .*pp=2"):
        C.check_compression_supported(
            GradCompression(method="powersgd"), ParallelLayout(dp=1, tp=2, pp=2)
        )


def test_topk_scope_is_validated():
    with pytest.raises(LayoutError, match="topk_scope: 'layer' is not one of tensor, bucket"):
        GradCompression(method="topk", topk_scope="layer")


def test_register_none_and_non_ddp():
    assert C.register_compression(torch.nn.Linear(2, 2), GradCompression()) is None
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        C.register_compression(torch.nn.Linear(2, 2), GradCompression(method="topk"))


# --------------------------------------------------------------------------- multi-rank tests
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    results = _spawn("_worker_two", 2, tmp_path_factory.mktemp("two_ranks"))
    return {name: [r[name] for r in results] for name in results[0]}


def test_ratio_one_equals_dense_allreduce(two_ranks):
    for r in two_ranks["dense_parity"]:
        plain, hooked = r["params"]
        for a, b in zip(plain, hooked, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-6)
        assert r["dense_steps"] == 3
        assert r["bytes"][0] == r["bytes"][1] == 3 * 808 * 4  # 808 parameters, fp32


def test_topk_run(two_ranks):
    results = two_ranks["topk"]
    for r in results:
        for mc, ratio in CASES:
            assert r[f"conserved_{mc}_{ratio}"], f"mass not conserved (mc={mc}, ratio={ratio})"
            assert r[f"averaged_{mc}_{ratio}"], f"result != sum of sent entries / W ({ratio})"
            sizes = r[f"bucket_sizes_{mc}_{ratio}"]
            assert sizes == [808, 264, 544, 264, 544]  # one bucket, then rebuilt into two
        assert r["repro"]
        # warm-up 2 at ratio 0.01: step 0 dense, step 1 density 0.1, then 0.01
        sent = r["sent_per_step"]
        assert sent[0] == 808 * 4
        assert r["dense_steps"] == 1
        assert sent[2] == sent[3] < 0.3 * r["dense_step_bytes"]
        assert sum(r["bucket_numels"]) == 808
        # topk_scope=tensor: ceil(ratio * numel) per parameter (808 = 512 + 32 + 256 + 8)
        numels = [512, 32, 256, 8]
        assert sent[3] == sum(C.topk_k(n, 0.01) * (4 + 4) for n in numels) == 11 * 8
        # density 0.1: 83 values and the positions as a bitmap, ceil(264/8) + ceil(544/8) bytes
        assert sent[1] == sum(C.topk_k(n, 0.1) * 4 for n in numels) + 33 + 68 == 83 * 4 + 101
        assert r["dense_step_bytes"] == 808 * 4
        wire, dense_wire = r["wire_step"]
        assert wire == sent[3] * (2 - 1) and dense_wire == 808 * 4 * 2 * (2 - 1) / 2
        assert r["resume_topk"], "resumed run differs from the uninterrupted one"
    assert results[0]["sent_per_step"] == results[1]["sent_per_step"]


def test_powersgd_run(two_ranks):
    for r in two_ranks["powersgd"]:
        losses = r["losses"]
        assert all(math.isfinite(x) for x in losses)
        assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
        assert r["dense_steps"] == 2  # start_powerSGD_iter = max(2, warmup_steps)
        assert r["sent"][0] == r["sent"][1] == 808 * 4
        payload, dense = r["step_bytes"]
        assert payload < dense
        # our estimate = uncompressed biases + P + Q, with torch's P/Q sizes
        assert payload == r["torch_pq_bytes"] + (32 + 8) * 4
        assert r["resume_powersgd"], "resumed PowerSGD run differs from the uninterrupted one"


def test_local_gradient_clipping(two_ranks):
    for r in two_ranks["local_clip"]:
        assert r["match"] == [True, True, True], "result != average of the clipped gradients"
        for (coef, norm, _), want_coef, want_norm in r["clip"]:
            assert coef == pytest.approx(want_coef, rel=1e-9)
            assert norm == pytest.approx(want_norm, rel=1e-9)
            assert coef < 1  # the clip binds: the test checks a real scaling
        assert [b for (_, _, b), _, _ in r["clip"]] == [1, 2, 2]  # one bucket, then rebuilt
        assert r["sparse_finite"]


def test_local_grad_clip_is_validated():
    with pytest.raises(LayoutError, match="local_grad_clip: only with method topk"):
        GradCompression(method="powersgd", local_grad_clip=1.0)
    with pytest.raises(LayoutError, match="local_grad_clip: must be a finite number >= 0"):
        GradCompression(method="topk", local_grad_clip=-1.0)


@pytest.mark.slow
def test_three_ranks(tmp_path):
    """ratio=1 parity and sparse steps with W=3 (1/3 is not exact in float: allclose)."""
    for r in _spawn("_worker_three", 3, tmp_path):
        assert r["close"]
        assert all(math.isfinite(x) for x in r["sparse_losses"])
        wire, payload = r["wire"]
        assert wire == 2 * payload  # (W - 1) * payload


# ------------------------------------------------------------------- bitmap positions, gap-aware AdamW
def test_bitmap_round_trip_and_choice():
    g = torch.Generator().manual_seed(3)
    for n, k in [(1, 1), (7, 3), (8, 8), (808, 83), (1001, 500)]:
        idx = torch.randperm(n, generator=g)[:k].to(torch.int32)
        bits = C.pack_bitmap(idx, n)
        assert bits.dtype == torch.uint8 and bits.numel() == C.bitmap_bytes(n) == -(-n // 8)
        assert torch.equal(C.unpack_bitmap(bits, n), torch.sort(idx.long()).values)
    # bitmap when ceil(N/8) < 4k: from a density of about 1/32
    assert not C.use_bitmap(32, 1024) and C.use_bitmap(33, 1024)
    assert C.bitmap_allgather_bytes(83, 808, 4, world=3) == (83 * 4 + 101, 2.0 * (83 * 4 + 101))


def _adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)


def test_gap_aware_adam_is_torch_adamw_on_dense_steps():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 7))
    b = torch.nn.Parameter(a.detach().clone())
    ref, ours = _adamw([a], foreach=False), _adamw([b])
    for _ in range(6):
        g = torch.randn(5, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        C.adamw_step_gap_aware(ours)
        assert torch.equal(a, b)  # bit for bit
    assert torch.equal(ref.state[a]["exp_avg_sq"], ours.state[b]["exp_avg_sq"])
    assert ours.state[b]["last_sent"].eq(6).all()
    with pytest.raises(ValueError, match="amsgrad"):
        C.adamw_step_gap_aware(torch.optim.AdamW([b], amsgrad=True))


def test_gap_aware_adam_sent_zero_is_a_dense_step_and_masks_are_checked():
    """A zero gradient that was sent (an embedding row no token used) takes torch's step: the
    gap is the hook's, not the gradient's value."""
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ref, ours = _adamw([a], foreach=False), _adamw([b])
    for s in range(5):
        g = torch.randn(4, 3)
        g[s % 4] = 0.0  # one row without gradient each step, sent as a zero
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        C.adamw_step_gap_aware(ours, {b: torch.ones(4, 3, dtype=torch.bool)})
        assert torch.equal(a, b)
    # held back (mask False): v is kept, not decayed
    v = ours.state[b]["exp_avg_sq"].clone()
    b.grad = torch.zeros(4, 3)
    C.adamw_step_gap_aware(ours, {b: torch.zeros(4, 3, dtype=torch.bool)})
    assert torch.equal(ours.state[b]["exp_avg_sq"], v)
    with pytest.raises(ValueError, match="sent mask of shape"):
        C.adamw_step_gap_aware(ours, {b: torch.ones(3, dtype=torch.bool)})


def test_gap_aware_adam_restores_the_dense_step_size():
    """A gradient g held back for T steps and sent as T * g: torch's AdamW inflates
    sqrt(exp_avg_sq) about sqrt(T) times and moves less; the gap-aware step keeps v_hat = g^2 and
    moves as far as dense AdamW over the same T steps."""
    T, steps, g = 8, 64, 0.5
    moved = {}
    for name in ("dense", "torch", "gap"):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
        for s in range(steps):
            sparse = name != "dense"
            p.grad = torch.full((1,), g * T if (s % T == T - 1) else 0.0) if sparse else None
            if not sparse:
                p.grad = torch.full((1,), g)
            if s < T:  # a dense warm-up fills exp_avg_sq first
                p.grad = torch.full((1,), g)
            if name == "gap":  # the hook's mask: this coordinate sent or held back
                C.adamw_step_gap_aware(opt, {p: p.grad != 0})
            else:
                opt.step()
        moved[name] = -p.item()
        if name == "gap":
            # bias-corrected second moment: exactly dense AdamW's g^2 (T lumped updates)
            v_hat = opt.state[p]["exp_avg_sq"] / (1 - 0.95**steps)
            torch.testing.assert_close(v_hat, torch.tensor([g * g]))
    assert moved["gap"] == pytest.approx(moved["dense"], rel=0.05)
    assert moved["torch"] < 0.6 * moved["dense"]


def test_gap_aware_adam_is_topk_only():
    with pytest.raises(LayoutError, match="gap_aware_adam: only with method topk"):
        GradCompression(method="powersgd", gap_aware_adam=True)


def test_gap_aware_state_survives_a_dcp_checkpoint(tmp_path):
    """save_dcp / load_dcp on one process: the gap counters come back, so the resumed steps
    equal the uninterrupted ones bit for bit."""
    from deepwhale.parallel import checkpoint as pckpt

    def run(model, opt, steps, start):
        for s in range(start, start + steps):
            g = torch.Generator().manual_seed(s)
            sent = {}
            for p in model.parameters():  # a sparse gradient: most entries held back
                full = torch.randn(p.shape, generator=g)
                sent[p] = torch.rand(p.shape, generator=g) < 0.2
                p.grad = full * sent[p]
            C.adamw_step_gap_aware(opt, sent)

    torch.manual_seed(0)
    whole = torch.nn.Linear(6, 4)
    half = torch.nn.Linear(6, 4)
    half.load_state_dict(whole.state_dict())
    o_whole, o_half = _adamw(whole.parameters()), _adamw(half.parameters())
    run(whole, o_whole, 6, 0)
    run(half, o_half, 3, 0)
    folder = pckpt.save_dcp(tmp_path, 3, half, o_half, {"step": 3}, keep_last=1)
    assert pckpt.has_key_suffix(folder, ".last_sent")
    assert not pckpt.has_key_suffix(tmp_path / "missing", ".last_sent")
    fresh = torch.nn.Linear(6, 4)
    o_fresh = _adamw(fresh.parameters())
    C.init_gap_aware_state(o_fresh)
    pckpt.load_dcp(folder, fresh, o_fresh)
    run(fresh, o_fresh, 3, 3)
    for a, b in zip(whole.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
