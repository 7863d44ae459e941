"""Speculative decoding benchmark: acceptance rate and decode tokens/s against plain greedy
decoding, measured side by side in one run (interleaved repeats) on the same target.

No target/draft pair of real checkpoints ships in ``../shared/data`` (its only model is
stories260K), so the drafts are built from two real, bundled, trained targets: stories260K
(llama2.c, 260K parameters) and ``deepwhale-demo`` (DeepSeek-V3 shape, MLA + DeepSeekMoE, 5.8M
parameters, trained by the demo recipe):

* ``early-exit-L``: the target's own first ``L`` layers, final norm and head
  (:func:`~deepwhale.inference.speculative.truncated_draft`), a separate draft model;
* ``mtp``: a multi-token-prediction module (DeepSeek-V3 §2.2; for deepwhale-demo an MLA + MoE
  layer, the released V3 MTP's shape) trained here by self-distillation: on sequences the target
  samples, the module at position ``i`` (``h_i`` and ``t_{i+1}``) learns the target's own
  next-token distribution at ``i + 1`` (the embedding and head are the target's, frozen, as
  DeepSeek-V3 shares them); ``--mtp-steps`` / ``--demo-mtp-steps`` AdamW steps on the CPU;
* ``random mtp``: a random debug-v3 model with a random MTP module: acceptance is near zero,
  so its ratio is the overhead floor of a draft that is always wrong.

Output tokens are checked identical to greedy for every run. DeepSeek-V3 (§5.4.3) reports 85-90%
acceptance for the second token with its MTP module and 1.8x decode tokens/s.

Usage: ``python benchmarks/speculative.py [--json] [--quiet] [--tokens 128] [--k 1 2 4]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepwhale.checkpoint.hub import DEFAULT_MODEL, bundled  # noqa: E402
from deepwhale.checkpoint.io import load_model  # noqa: E402
from deepwhale.inference.sampling import SamplingParams  # noqa: E402
from deepwhale.inference.speculative import (  # noqa: E402
    greedy_decode,
    speculative_decode,
    truncated_draft,
)
from deepwhale.model.cache import make_cache  # noqa: E402
from deepwhale.model.flavours import flavour_config  # noqa: E402
from deepwhale.model.mtp import MultiTokenPredictor  # noqa: E402
from deepwhale.model.transformer import CausalLM  # noqa: E402
from deepwhale.tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "Lily and Ben went to the park",
    "The little dog was sad because",
    "One day, a girl named Sue found a",
]


def _progress(quiet: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, leave=False)


@torch.inference_mode()
def sample_corpus(target: CausalLM, n_seq: int, length: int, seed: int = 0) -> torch.Tensor:
    """``(n_seq, length)`` token sequences the target samples at temperature 1 from BOS."""
    g = torch.Generator().manual_seed(seed)
    caches = make_cache(target.config, n_seq, length)
    bos = target.config.bos_token_id
    tokens = torch.full((n_seq, 1), 1 if bos is None else bos)
    logits = target(tokens, caches=caches)[:, -1]
    for t in range(1, length):
        nxt = torch.multinomial(logits.float().softmax(-1), 1, generator=g)
        tokens = torch.cat([tokens, nxt], 1)
        logits = target(nxt, positions=torch.full((n_seq, 1), t), caches=caches)[:, -1]
    return tokens


def distill_mtp(target: CausalLM, steps: int, quiet: bool, seed: int = 0) -> MultiTokenPredictor:
    """Train one MTP module on the frozen target by self-distillation (see the module docstring).

    Loss: cross-entropy of the module's logits at position ``i`` against the target's softmax at
    ``i + 1``, on sequences the target sampled. Returns the module in eval mode."""
    config = dataclasses.replace(target.config, num_nextn_predict_layers=1)
    torch.manual_seed(seed)
    mtp = MultiTokenPredictor(config)
    mtp.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    layer = mtp.layer(0)
    with torch.no_grad():
        layer.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        layer.shared_head.head.weight.copy_(target.lm_head.weight)
        layer.shared_head.norm.weight.copy_(target.model.norm.weight)
    layer.embed_tokens.weight.requires_grad_(False)
    layer.shared_head.head.weight.requires_grad_(False)
    data = sample_corpus(target, 256, 128, seed)
    opt = torch.optim.AdamW([p for p in mtp.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(seed + 1)
    bar = _progress(quiet, steps, "distil MTP")
    mtp.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (32,), generator=g)
        with torch.no_grad():
            hidden = target.hidden_states(data[idx])
            soft = target.lm_head(hidden[:, 1:-1]).float().softmax(-1)  # the target at i + 1
        _, logits = mtp(data[idx, 1:-1], hidden[:, :-2])  # t_{i+1} and h_i
        loss = -(soft * F.log_softmax(logits.float(), -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return mtp.eval()


def measure(target, prompts, n_tokens, k, draft, repeats) -> dict:
    """Interleaved plain/speculative runs: tokens/s (median over repeats), acceptance."""
    plain_t, spec_t = [], []
    drafted = accepted = rounds = first_prop = first_acc = 0
    for r in range(repeats):
        for p in prompts:
            t0 = time.perf_counter()
            ref = greedy_decode(target, p, n_tokens)
            t1 = time.perf_counter()
            res = speculative_decode(target, p, n_tokens, draft=draft, k=k)
            t2 = time.perf_counter()
            if res.tokens != ref:
                raise AssertionError(f"speculative output differs from greedy (k={k})")
            plain_t.append(t1 - t0)
            spec_t.append(t2 - t1)
            if r == 0:
                s = res.stats
                drafted, accepted, rounds = (
                    drafted + s.drafted,
                    accepted + s.accepted,
                    rounds + s.rounds,
                )
                first_prop += s.proposed_at[0] if s.proposed_at else 0
                first_acc += s.accepted_at[0] if s.accepted_at else 0
    n = len(prompts)
    plain = (
        n_tokens
        * n
        / statistics.median([sum(plain_t[i : i + n]) for i in range(0, len(plain_t), n)])
    )
    spec = (
        n_tokens * n / statistics.median([sum(spec_t[i : i + n]) for i in range(0, len(spec_t), n)])
    )
    return {
        "k": k,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "first_token_acceptance": first_acc / first_prop if first_prop else 0.0,
        "tokens_per_round": (accepted + rounds) / rounds if rounds else 0.0,
        "greedy_tps": plain,
        "speculative_tps": spec,
        "ratio": spec / plain,
    }


def sampled_acceptance(target, prompts, n_tokens, k, temperature, seeds=3) -> dict:
    """Acceptance under the rejection rule when sampling at ``temperature`` (no tokens/s: the
    output is random, there is no identical plain run to time against)."""
    drafted = accepted = rounds = 0
    for seed in range(seeds):
        for p in prompts:
            params = SamplingParams(temperature=temperature, seed=seed)
            s = speculative_decode(target, p, n_tokens, draft="mtp", k=k, params=params).stats
            drafted, accepted, rounds = (
                drafted + s.drafted,
                accepted + s.accepted,
                rounds + s.rounds,
            )
    return {
        "k": k,
        "temperature": temperature,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_round": (accepted + rounds) / rounds if rounds else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="draft tokens per round")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    ap.add_argument(
        "--mtp-steps", type=int, default=1000, help="MTP distillation steps, stories260K"
    )
    ap.add_argument(
        "--demo-mtp-steps", type=int, default=600, help="MTP distillation steps, deepwhale-demo"
    )
    args = ap.parse_args()
    train_s: dict[str, float] = {}

    targets = {}
    for name, folder, exits, steps in (
        ("stories260K", DEFAULT_MODEL, (1, 2), args.mtp_steps),
        ("deepwhale-demo", bundled("deepwhale-demo"), (2,), args.demo_mtp_steps),
    ):
        model = load_model(folder)
        tok = Tokenizer.from_pretrained(folder)
        t0 = time.perf_counter()
        model.mtp = distill_mtp(model, steps, args.quiet)
        targets[name] = (model, [tok.encode(p) for p in PROMPTS], exits)
        train_s[name] = time.perf_counter() - t0
    v3 = CausalLM(flavour_config("debug-v3", num_nextn_predict_layers=1)).eval()
    v3.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    v3.mtp = MultiTokenPredictor(v3.config).eval()
    v3.mtp.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    v3_prompts = [[1, *range(10 + 7 * i, 20 + 7 * i)] for i in range(len(PROMPTS))]

    cases = []
    for name, (model, prompts, exits) in targets.items():
        cases.append((name, "mtp", model, "mtp", prompts))
        cases += [
            (name, f"early-exit-{n}", model, truncated_draft(model, n), prompts) for n in exits
        ]
    cases.append(("random debug-v3", "random mtp", v3, "mtp", v3_prompts))
    rows = []
    bar = _progress(args.quiet, len(cases) * len(args.k), "measure")
    for tname, name, tgt, draft, ps in cases:
        for k in args.k:
            row = measure(tgt, ps, args.tokens, k, draft, args.repeats)
            rows.append({"target": tname, "draft": name, **row})
            bar.update()
    bar.close()
    sampled = [
        {"target": name, **sampled_acceptance(model, prompts, args.tokens, k, 1.0)}
        for name, (model, prompts, _) in targets.items()
        for k in args.k
    ]
    res = {
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "prompts": len(PROMPTS),
        "targets": "stories260K (llama2.c, 260K) and deepwhale-demo (DeepSeek-V3 shape, 5.8M)",
        "mtp_distill_steps": {"stories260K": args.mtp_steps, "deepwhale-demo": args.demo_mtp_steps},
        "mtp_distill_seconds": train_s,
        "rows": rows,
        "mtp_sampled": sampled,
        "deepseek_v3_reported": {"second_token_acceptance": "0.85-0.90", "tps_ratio": 1.8},
    }
    if args.json:
        print(json.dumps(res))
        return
    secs = ", ".join(f"{n} {t:.0f}s" for n, t in train_s.items())
    print(
        f"{args.tokens} new tokens x {len(PROMPTS)} prompts, {res['threads']} threads, MTP "
        f"distilled {args.mtp_steps} / {args.demo_mtp_steps} steps ({secs}); outputs identical "
        "to greedy in every run"
    )
    print(
        f"{'target':<16}{'draft':<13}{'k':>3}{'accept':>8}{'1st tok':>8}{'tok/round':>10}"
        f"{'greedy t/s':>11}{'spec t/s':>10}{'ratio':>7}"
    )
    for r in rows:
        print(
            f"{r['target']:<16}{r['draft']:<13}{r['k']:>3}{r['acceptance_rate']:>8.1%}"
            f"{r['first_token_acceptance']:>8.1%}{r['tokens_per_round']:>10.2f}"
            f"{r['greedy_tps']:>11.0f}{r['speculative_tps']:>10.0f}{r['ratio']:>6.2f}x"
        )
    for r in sampled:
        print(
            f"{r['target']} mtp, sampled at temperature {r['temperature']:g} (rejection rule), "
            f"k={r['k']}: "
            f"acceptance {r['acceptance_rate']:.1%}, {r['tokens_per_round']:.2f} tokens per round"
        )
    print("DeepSeek-V3 (tech report §5.4.3): 85-90% second-token acceptance, 1.8x tokens/s")


if __name__ == "__main__":
    main()
