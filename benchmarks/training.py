"""Training throughput: deepwhale's Trainer against a plain PyTorch AdamW loop, side by side.

Both loops train the same model (same flavour, same seed, so the same initial weights) on the
same batches of real text (tiny shakespeare tokenized with the bundled stories260K tokenizer),
alternating step by step so that load on a shared machine hits both alike; the medians of the
per-step times give tokens/s. The reference loop is the
textbook one: ``loss = cross_entropy(model(x), y); loss.backward(); clip; opt.step()``. The
Trainer adds what it adds in real runs: token-weighted accumulation, the MoE bias update (and
aux loss where the config sets one), metrics bookkeeping.

    python benchmarks/training.py --json
    python benchmarks/training.py --models debug-v3 --steps 5
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
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepwhale.train.config import load_config  # noqa: E402
from deepwhale.train.data import IGNORE_INDEX  # noqa: E402
from deepwhale.train.trainer import Trainer, build_model  # noqa: E402

TEXT = REPO.parent / "shared" / "data" / "corpus" / "en" / "tinyshakespeare" / "input.txt"


class ReferenceLoop:
    """Plain PyTorch: AdamW, mean cross-entropy, clip, step."""

    def __init__(self, model, lr, clip, autocast):
        self.model, self.clip, self.autocast = model.train(), clip, autocast
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(self, batch) -> float:
        """One optimizer step on ``batch``; returns its seconds."""
        t0 = time.perf_counter()
        x, y = batch["input_ids"], batch["labels"]
        with self.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def bench_model(
    name: str, steps: int, mbs: int, seq_len: int, device: str, text: Path = TEXT
) -> dict:
    """Tokens/s of the Trainer and the reference loop on ``name``, alternating step by step."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"out_dir={tmp}",
                f"model.name={name}",
                f"data.path={text}",
                f"data.seq_len={seq_len + 1}",
                "data.limit=4000",
                f"train.micro_batch_size={mbs}",
                f"train.steps={10**6}",
                f"train.device={device}",
                "optim.lr=1e-3",
                "log.quiet=true",
                "log.csv=false",
                "log.tensorboard=false",
                "checkpoint.save_final=false",
            ],
        )
        ours = Trainer(cfg)
        ref_model, _ = build_model(cfg.model, cfg.train.seed)
        ref_model.to(ours.device)
        n_params = sum(p.numel() for p in ref_model.parameters())
        tokens_per_step = mbs * seq_len
        ref = ReferenceLoop(ref_model, 1e-3, 1.0, ours._autocast)
        ours_t, ref_t = [], []
        for i in range(steps + 1):  # step by step, alternating; the first is warm-up
            state = ours.sampler.state_dict()
            batch = {k: v.to(ours.device) for k, v in ours.next_batches()[0].items()}
            ours.sampler.load_state_dict(state)  # the Trainer reads the very same batch
            t0 = time.perf_counter()
            ours.train_step()
            if ours.device.type == "cuda":
                torch.cuda.synchronize()
            t_ours = time.perf_counter() - t0
            t_ref = ref.step(batch)
            if i:
                ours_t.append(t_ours)
                ref_t.append(t_ref)
    ours_tps = tokens_per_step / statistics.median(ours_t)
    ref_tps = tokens_per_step / statistics.median(ref_t)
    return {
        "model": name,
        "params": n_params,
        "tokens_per_step": tokens_per_step,
        "deepwhale_tokens_per_s": round(ours_tps, 1),
        "reference_tokens_per_s": round(ref_tps, 1),
        "ratio": round(ours_tps / ref_tps, 3),
        "steps_timed": len(ours_t),
    }


def main() -> None:
    """Run the benchmark; ``--json`` prints one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--models", nargs="+", default=["debug-llama", "debug-v3", "demo-v3"])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per loop")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text", type=Path, default=TEXT, help="training text (default: shakespeare)")
    args = ap.parse_args()
    if not args.text.exists():
        sys.exit(f"error: {args.text} not found (the shared data folder)")
    from rich.progress import Progress

    results = []
    with Progress(disable=args.quiet, transient=True) as progress:
        task = progress.add_task("models", total=len(args.models))
        for name in args.models:
            progress.update(task, description=f"{name}: ours vs reference loop")
            results.append(
                bench_model(
                    name, args.steps, args.micro_batch_size, args.seq_len, args.device, args.text
                )
            )
            progress.advance(task)
    for r in results:
        if not args.json:
            print(
                f"{r['model']:12s} {r['params'] / 1e6:6.2f}M params  deepwhale "
                f"{r['deepwhale_tokens_per_s']:9.1f} tok/s  reference "
                f"{r['reference_tokens_per_s']:9.1f} tok/s  ratio {r['ratio']:.2f}x"
            )
    out = {
        "benchmark": "training",
        "device": "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "results": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
