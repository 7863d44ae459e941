"""INT8 accuracy ratio on tasks the bundled models score well above chance on.

The product claims INT8 "keeps 98% of the accuracy". ARC, HellaSwag and the other public
benchmarks cannot check that on the bundled models: both score at chance there, so any ratio is
noise. This script builds two 4-way multiple-choice tasks from the shared data, in the domains
the models were trained on, and runs ``deepwhale eval --quantize fp32,int8,int8-dynamic`` on
both models, side by side in one run:

* ``tatoeba_mc`` (deepwhale-demo, trained on the Tatoeba pairs): given an English sentence and a
  newline (the demo's training layout ``en\\nzh``), pick its Chinese translation among four;
  the three distractors are translations of other pairs of the nearest Chinese length, so
  length does not give the answer away.
* ``tinystories_cloze`` (both models): given a TinyStories story so far, pick its next sentence
  among four (the other three come from the other stories).

The bundled demo is at chance on ``tatoeba_mc`` too (its validation loss is 5.2 nats/token), so
the script also fine-tunes it (all weights, ``deepwhale train`` from the demo's checkpoint) on
the Tatoeba pairs *minus the evaluated ones*, in the demo's training layout (20 pairs per
document), for ``--finetune-steps`` steps, and evaluates that model as ``demo-tatoeba``. Its
``tatoeba_mc`` items are held out; it is a check of what quantization keeps, not a useful
translator.

The items are drawn with a fixed seed, so every run builds the same task files and the same
fine-tuning data. The tasks are in the models' training domains (stories260K was trained on
TinyStories): they measure whether quantization keeps the fp32 model's decisions.

Prints, per model, task and mode: ``acc`` / ``acc_norm`` with stderr and the ratio to fp32,
and the weight bytes. ``--json`` prints the same as one JSON object.

Usage: ``python benchmarks/int8_accuracy.py [--limit N] [--json] [--quiet] [--work DIR]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
MODES = "fp32,int8,int8-dynamic"
SEED = 1234

TATOEBA_YAML = """\
# English -> Chinese translation choice, built by benchmarks/int8_accuracy.py from the
# Tatoeba pairs in ../shared/data/corpus/mixed/cmn-eng/cmn.txt.
task: tatoeba_mc
dataset_path: json
data_files:
  test: tatoeba_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{en}}\\n"
target_delimiter: ""
doc_to_target: "{{gold}}"
doc_to_choice: "{{choices}}"
num_fewshot: 0
"""

CLOZE_YAML = """\
# Next-sentence choice in TinyStories, built by benchmarks/int8_accuracy.py from
# ../shared/data/corpus/en/tinystories/tinystories_sample.txt.
task: tinystories_cloze
dataset_path: json
data_files:
  test: tinystories_cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_target: "{{gold}}"
doc_to_choice: "{{choices}}"
num_fewshot: 0
"""


def tatoeba_pairs() -> list[tuple[str, str]]:
    """(English, Chinese) pairs of cmn.txt, in file order."""
    pairs = []
    text = (SHARED / "corpus/mixed/cmn-eng/cmn.txt").read_text(encoding="utf-8-sig")
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0].strip() and cols[1].strip():
            pairs.append((cols[0].strip(), cols[1].strip()))
    return pairs


def tatoeba_docs(n: int, rng: random.Random) -> list[dict]:
    """``n`` items from cmn.txt: {en, choices (4 Chinese sentences), gold}."""
    pairs = tatoeba_pairs()
    by_len: dict[int, list[int]] = {}
    for i, (_, zh) in enumerate(pairs):
        by_len.setdefault(len(zh), []).append(i)
    docs = []
    for i in rng.sample(range(len(pairs)), n):
        en, zh = pairs[i]
        pool, d = [], 0
        while len(pool) < 3:  # nearest lengths first, distinct texts
            for length in {len(zh) - d, len(zh) + d}:
                pool += [j for j in by_len.get(length, []) if pairs[j][1] != zh]
            d += 1
        distract = rng.sample(sorted(set(pool), key=lambda j: abs(len(pairs[j][1]) - len(zh))), 3)
        choices = [zh] + [pairs[j][1] for j in distract]
        rng.shuffle(choices)
        docs.append({"en": en, "choices": choices, "gold": choices.index(zh)})
    return docs


def cloze_docs(rng: random.Random) -> list[dict]:
    """Every sentence after the first of each story: {context, choices, gold}."""
    text = (SHARED / "corpus/en/tinystories/tinystories_sample.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    split = [re.findall(r"[^.!?]+[.!?]+[\"']?", " ".join(s.split())) for s in stories]
    split = [[x.strip() for x in s] for s in split]
    docs = []
    for k, sents in enumerate(split):
        others = [x for j, s in enumerate(split) if j != k for x in s]
        for i in range(1, len(sents)):
            choices = [sents[i]] + rng.sample(others, 3)
            rng.shuffle(choices)
            docs.append(
                {
                    "context": " ".join(sents[:i]),
                    "choices": choices,
                    "gold": choices.index(sents[i]),
                }
            )
    return docs


FINETUNE_YAML = """\
# Full fine-tune of deepwhale-demo on the Tatoeba pairs minus the tatoeba_mc items
# (benchmarks/int8_accuracy.py); the demo's own recipe (examples/demo/train.yaml) otherwise.
out_dir: {out}
model:
  name: {demo}
data:
  path: {data}
  format: jsonl
  seq_len: 256
  val_fraction: 0.02
optim: {{lr: 1.0e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, grad_clip: 1.0}}
schedule: {{name: cosine, warmup_steps: 20, min_lr_ratio: 0.1}}
train: {{steps: {steps}, micro_batch_size: 8, seed: 1}}
moe: {{aux_loss_alpha: 0.0001, seq_aux: true, bias_update_speed: 0.001}}
eval: {{interval: 200, max_batches: 10}}
checkpoint: {{interval: 100000, resume: none}}
log: {{interval: 50}}
"""


def finetune(work: Path, held_out: set[str], steps: int, quiet: bool) -> Path:
    """Fine-tune deepwhale-demo on the Tatoeba pairs whose English is not in ``held_out``;
    return the final model folder (reused when it exists for the same steps)."""
    run = work / f"finetune-{steps}"
    final = run / "final"
    if (final / "config.json").exists():
        return final
    pairs = [p for p in tatoeba_pairs() if p[0] not in held_out]
    random.Random(SEED).shuffle(pairs)
    data = work / "tatoeba_train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(0, len(pairs), 20):
            text = "\n\n".join(f"{en}\n{zh}" for en, zh in pairs[i : i + 20])
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    cfg = work / "finetune.yaml"
    demo = ROOT / "deepwhale" / "assets" / "deepwhale-demo"
    cfg.write_text(FINETUNE_YAML.format(out=run, demo=demo, data=data, steps=steps))
    cmd = [sys.executable, "-m", "deepwhale", "train", "--config", str(cfg)]
    subprocess.run(cmd + (["--quiet"] if quiet else []), check=True)
    return final


def build(work: Path, n: int) -> dict[str, Path]:
    """Write both tasks' JSONL and YAML under ``work``; return {task: yaml path}."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, docs, yaml in (
        ("tatoeba_mc", tatoeba_docs(n, random.Random(SEED)), TATOEBA_YAML),
        ("tinystories_cloze", cloze_docs(random.Random(SEED)), CLOZE_YAML),
    ):
        (work / f"{name}.jsonl").write_text(
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        )
        (work / f"{name}.yaml").write_text(yaml)
        out[name] = work / f"{name}.yaml"
    return out


def run(
    label: str, model: str, tasks: list[Path], work: Path, limit: int | None, quiet: bool
) -> dict:
    """``deepwhale eval --quantize`` for ``model`` (into ``work/runs/label``); {mode: results}."""
    from deepwhale.cli import app

    out = work / "runs" / label
    args = ["eval", "--model", model, "--tasks", ",".join(str(t) for t in tasks)]
    args += ["--data-dir", str(work), "--quantize", MODES, "--out", str(out), "--batch-size", "8"]
    if limit is not None:
        args += ["--limit", str(limit)]
    if quiet:
        args.append("--quiet")
    res = CliRunner().invoke(app, args)
    if res.exit_code != 0:
        raise SystemExit(f"deepwhale eval failed for {model}: {res.stderr or res.output}")
    return {m: json.loads((out / m / "results.json").read_text()) for m in MODES.split(",")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--tatoeba-items", type=int, default=400, help="Tatoeba items to build")
    p.add_argument("--finetune-steps", type=int, default=1200, help="0 skips the fine-tune")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "int8_accuracy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    tasks = build(a.work, a.tatoeba_items)
    plan = {
        "deepwhale-demo": [tasks["tatoeba_mc"], tasks["tinystories_cloze"]],
        "stories260K": [tasks["tinystories_cloze"]],  # a 512-token English vocabulary
    }
    if a.finetune_steps:
        docs = [json.loads(x) for x in (a.work / "tatoeba_mc.jsonl").read_text().splitlines()]
        tuned = finetune(a.work, {d["en"] for d in docs}, a.finetune_steps, a.quiet)
        plan[f"demo-tatoeba={tuned}"] = [tasks["tatoeba_mc"], tasks["tinystories_cloze"]]
    report: dict = {}
    for model, ts in plan.items():
        model, _, path = model.partition("=")
        runs = run(model, path or model, ts, a.work, a.limit, a.quiet)
        base = runs["fp32"]
        entry: dict = {"weight_bytes": {m: r["weight_bytes"] for m, r in runs.items()}}
        for t in base["results"]:
            entry[t] = {}
            for m, r in runs.items():
                res = r["results"][t]
                row = {"samples": res["samples"]}
                for k in ("acc", "acc_norm"):
                    row[k], row[f"{k}_stderr"] = res[k], res[f"{k}_stderr"]
                    row[f"{k}_ratio"] = (
                        res[k] / base["results"][t][k] if base["results"][t][k] else None
                    )
                entry[t][m] = row
        report[model] = entry
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        "| model | task | mode | n | acc ± se | acc/fp32 | acc_norm ± se | acc_norm/fp32 | weight bytes/fp32 |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for model, entry in report.items():
        wb = entry.pop("weight_bytes")
        for t, modes in entry.items():
            for m, r in modes.items():
                print(
                    f"| {model} | {t} | {m} | {r['samples']} | {r['acc']:.4f} ± {r['acc_stderr']:.4f}"
                    f" | {r['acc_ratio']:.4f} | {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"
                    f" | {r['acc_norm_ratio']:.4f} | {wb[m] / wb['fp32']:.3f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
