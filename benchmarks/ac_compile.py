"""Activation checkpointing and compile in training: step time and saved activation bytes,
against the same Trainer without them, side by side.

Four Trainers of the same model (same flavour and seed, so the same initial weights) take the same
batches of real text, alternating step by step so that load on a shared machine hits all alike:

* ``plain``: eager, every activation kept;
* ``ac``: ``train.activation_checkpointing: full`` (each decoder layer recomputed in backward);
* ``compile``: ``train.compile: true`` (each decoder layer compiled, ``--backend``);
* ``ac+compile``: both, in the trainer's order (checkpointing, then compile).

Printed per variant: median step time and its ratio to ``plain``, the first step's seconds (the
compile's cold start), the losses' largest gap to ``plain`` over the run, and for the eager
variants the bytes autograd saves for backward in one forward of one micro-batch (measured with
``torch.autograd.graph.saved_tensors_hooks``; a checkpointed layer saves only its input), with
its ratio to ``plain``. Recompute costs about one more forward of each
checkpointed layer (Chen et al. 2016; Korthikanti et al. 2022 §4 put full recompute at 30-40%
more compute).

    python benchmarks/ac_compile.py --json
    python benchmarks/ac_compile.py --models debug-v3 --steps 4 --backend aot_eager
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepwhale.train.ac_compile import saved_activation_bytes  # noqa: E402
from deepwhale.train.config import load_config  # noqa: E402
from deepwhale.train.trainer import Trainer  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "corpus" / "en" / "tinyshakespeare" / "input.txt"
VARIANTS = {
    "plain": {},
    "ac": {"train.activation_checkpointing": "full"},
    "compile": {"train.compile": "true"},
    "ac+compile": {"train.activation_checkpointing": "full", "train.compile": "true"},
}


def bench_model(name: str, steps: int, mbs: int, seq_len: int, backend: str, text: Path) -> dict:
    """The four variants on ``name``, alternating step by step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for v, extra in VARIANTS.items():
            over = {
                "out_dir": f"{tmp}/{v.replace('+', '_')}",
                "model.name": name,
                "data.path": str(text),
                "data.seq_len": seq_len + 1,
                "data.limit": 4000,
                "train.micro_batch_size": mbs,
                "train.steps": 10**6,
                "train.device": "cpu",
                "train.compile_backend": backend,
                "optim.lr": 1e-3,
                "log.quiet": "true",
                "log.csv": "false",
                "log.tensorboard": "false",
                "checkpoint.save_final": "false",
                **extra,
            }
            trainers[v] = Trainer(load_config(None, [f"{k}={x}" for k, x in over.items()]))
        plain = trainers["plain"]
        ids = plain.next_batches()[0]["input_ids"]
        plain.sampler.load_state_dict(trainers["ac"].sampler.state_dict())  # same data again
        mem = {
            v: saved_activation_bytes(tr.model, ids)
            for v, tr in trainers.items()
            if "compile" not in v
        }
        times = {v: [] for v in VARIANTS}
        losses = {v: [] for v in VARIANTS}
        first = {}
        for i in range(steps + 1):
            for v, tr in trainers.items():
                t0 = time.perf_counter()
                out = tr.train_step()
                dt = time.perf_counter() - t0
                losses[v].append(float(out["loss"]))
                if i == 0:
                    first[v] = dt
                else:
                    times[v].append(dt)
    base = statistics.median(times["plain"])
    rows = []
    for v in VARIANTS:
        med = statistics.median(times[v])
        gap = max(abs(a - b) / abs(b) for a, b in zip(losses[v], losses["plain"], strict=True))
        m = mem.get(v)  # compiled graphs save what AOTAutograd's partitioner picks: not measured
        rows.append(
            {
                "model": name,
                "variant": v,
                "s_per_step": round(med, 4),
                "x_plain_time": round(med / base, 3),
                "first_step_s": round(first[v], 2),
                "max_rel_loss_gap": float(f"{gap:.3g}"),
                "saved_bytes": m,
                "x_plain_saved_bytes": None if m is None else round(m / mem["plain"], 3),
            }
        )
    return {"model": name, "tokens_per_step": mbs * seq_len, "rows": rows}


def main() -> None:
    """Run the benchmark; ``--json`` prints one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--models", nargs="+", default=["debug-v3", "demo-v3"])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--text", type=Path, default=TEXT, help="training text (default: shakespeare)")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for i, name in enumerate(args.models):
        if not (args.quiet or args.json):
            print(f"[{i + 1}/{len(args.models)}] {name} ...", file=sys.stderr, flush=True)
        results.append(
            bench_model(
                name, args.steps, args.micro_batch_size, args.seq_len, args.backend, args.text
            )
        )
    out = {
        "benchmark": "activation checkpointing and compile against the plain Trainer",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "results": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{'model':10} {'variant':11} {'s/step':>8} {'x plain':>8} {'1st step s':>10} "
        f"{'loss gap':>9} {'saved MB':>9} {'x plain':>8}"
    )
    for r in (row for res in results for row in res["rows"]):
        print(
            f"{r['model']:10} {r['variant']:11} {r['s_per_step']:8.3f} {r['x_plain_time']:8.3f} "
            f"{r['first_step_s']:10.2f} {r['max_rel_loss_gap']:9.2g} "
            + (
                f"{r['saved_bytes'] / 1e6:9.2f} {r['x_plain_saved_bytes']:8.3f}"
                if r["saved_bytes"] is not None
                else f"{'-':>9} {'-':>8}"
            )
        )


if __name__ == "__main__":
    main()
