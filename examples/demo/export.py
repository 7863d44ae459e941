"""Export the trained demo model for bundling: bf16 safetensors + tokenizer + a model card.

Usage: ``python examples/demo/export.py RUN_FINAL_DIR OUT_DIR``

Also draws the validation-loss curve from the run's ``metrics.csv`` to
``docs/demo_val_loss.png`` and prints greedy samples for a few zh/en prompts (they go into the
README and the model card).
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.checkpoint.io import save_model, write_json  # noqa: E402

PROMPTS = ["话说", "孔明", "First Citizen:", "Once upon a time", "I like"]


def val_curve(metrics_csv: Path, png: Path) -> list[tuple[int, float]]:
    """``[(step, val_loss)]`` from the trainer's CSV, drawn to ``png`` (matplotlib, Agg)."""
    points = []
    train = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val_loss"):
                points.append((int(row["step"]), float(row["val_loss"])))
            if row.get("loss"):
                train.append((int(row["step"]), float(row["loss"])))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.5, label="train loss")
    ax.plot(*zip(*points, strict=True), marker="o", ms=3, label="validation loss")
    ax.set_xlabel("step (8 x 256 tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("deepwhale-demo (DeepSeek-V3 shape, 5.8M params)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return points


def main() -> None:
    final, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = DeepSeekModel.from_pretrained(final, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    save_model(model.module, out, dtype=torch.bfloat16)  # 11.6 MB instead of 23 MB in fp32
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (final / name).is_file():
            shutil.copyfile(final / name, out / name)
    run = final.parent
    curve = val_curve(run / "metrics.csv", REPO / "docs" / "demo_val_loss.png")
    bundled = DeepSeekModel.from_pretrained(out, device="cpu")
    samples = {
        p: bundled.generate(p, max_new_tokens=40, temperature=0, repetition_penalty=1.1)
        for p in PROMPTS
    }
    write_json(out / "training_summary.json", {"val_loss": curve, "samples": samples})
    for p, s in samples.items():
        print(f"{p!r} -> {s!r}")
    print("validation loss:", ", ".join(f"{s}:{v:.3f}" for s, v in curve))


if __name__ == "__main__":
    main()
