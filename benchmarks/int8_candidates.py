"""INT8 kernels for deepwhale, measured against each other and fp32 in one run.

A ~58M-parameter LLaMA-shaped ``CausalLM`` (random weights; vocab 32000, hidden 512, 8 layers,
SwiGLU 1376, untied head) decodes greedily at batch 1 through deepwhale's own ``prefill`` /
``decode_one_token``: a 16-token prompt, then ``--tokens`` new tokens, timed after the prompt.
Candidates run in interleaved rounds; a round's speed is one over its median step time and the
best round counts (the machine may be shared). CPU runs use one thread unless ``--threads``.
``chosen`` is what :func:`~deepwhale.inference.quantize.quantize_model` picks on the device (the
first working kernel of ``KERNEL_ORDER``); ``fastest_measured`` is this run's fastest deepwhale
kernel per mode, so a disagreement says the order needs another look.

Candidates: fp32 (bf16 on CUDA); each deepwhale kernel of :data:`deepwhale.inference.quantize.
KERNELS` that runs on the device (``int8`` and ``int8-dynamic``); the picked ``int8-dynamic``
kernel with ``lm_head`` quantized too; torchao ``Int8WeightOnlyConfig`` and
``Int8DynamicActivationInt8WeightConfig`` (if torchao is installed); and on CPU
``torch.ao.quantization.quantize_dynamic`` (deprecated; fbgemm per-tensor weights). Every
candidate keeps ``lm_head`` in float except the ``+lm_head`` row.

It also reports weight-bytes ratios (whole model and attention/MLP Linears only) and perplexity
ratios of the bundled stories260K model on the shared TinyStories sample (windowed forward, and
token-by-token through the decode path for ``int8-dynamic``).

    python benchmarks/int8_candidates.py                 # table
    python benchmarks/int8_candidates.py --json --quiet  # one JSON line on stdout
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from deepwhale.checkpoint.io import load_model
from deepwhale.eval.perplexity import perplexity, read_documents
from deepwhale.inference import quantize as Q
from deepwhale.inference.generate import decode_one_token, prefill
from deepwhale.model.cache import make_cache
from deepwhale.model.config import ModelConfig
from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "deepwhale" / "assets" / "stories260K"
SAMPLE = (
    REPO.parent / "shared" / "data" / "corpus" / "en" / "tinystories" / "tinystories_sample.txt"
)
PROMPT_LEN = 16
MAX_ROUND_S = 3.0  # a round stops early after this many seconds (at least 8 steps)


def llama_58m() -> ModelConfig:
    """The benchmark model: 58.07M parameters (32.8M of them embeddings and head)."""
    return flavour_config("bench-llama-58m", max_position_embeddings=2048)


def decode_tok_s(model: nn.Module, config: ModelConfig, device: str, tokens: int) -> float:
    """Greedy batch-1 decode speed in tokens/s (prompt excluded): one over the median time of
    one decode step, so that a burst of load from another process does not count."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT_LEN), generator=g).to(device)
    dtype = model.model.embed_tokens.weight.dtype
    caches = make_cache(config, 1, PROMPT_LEN + tokens + 1, dtype=dtype, device=device)
    logits = prefill(model, prompt, caches)
    steps: list[float] = []
    for i in range(tokens):
        if len(steps) >= 8 and sum(steps) > MAX_ROUND_S:  # slow candidates: enough for a median
            break
        _sync(device)
        start = time.perf_counter()
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        logits = decode_one_token(model, token, PROMPT_LEN + i, caches)
        _sync(device)
        steps.append(time.perf_counter() - start)
    return 1.0 / statistics.median(steps)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _torchao(config_name: str):
    def build(model: CausalLM) -> CausalLM:
        import torchao.quantization as ao

        ao.quantize_(
            model,
            getattr(ao, config_name)(),
            filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head",
        )
        return model

    return build


def _quantize_dynamic(model: CausalLM) -> CausalLM:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {
        name: default_dynamic_qconfig
        for name, m in model.model.layers.named_modules(prefix="model.layers")
        if type(m) is nn.Linear
    }
    return quantize_dynamic(model, spec, dtype=torch.qint8)


def _deepwhale(mode: str, kernel: str | None, lm_head: bool = False):
    def build(model: CausalLM) -> CausalLM:
        return Q.quantize_model(model, mode, lm_head=lm_head, kernel=kernel)

    return build


def candidates(device: str) -> list[tuple[str, str, str, object]]:
    """``(name, mode, kernel, build)`` rows; build(model) -> quantized model or raises."""
    dev = torch.device(device).type
    rows = []
    for name, k in Q.KERNELS.items():
        if not k.devices or dev in k.devices:
            rows.append((f"deepwhale {k.mode} / {name}", k.mode, name, _deepwhale(k.mode, name)))
    picked = Q.KERNEL_ORDER.get(("int8-dynamic", dev), Q.KERNEL_ORDER[("int8-dynamic", "*")])[0]
    rows.append(
        (
            f"deepwhale int8-dynamic / {picked} +lm_head",
            "int8-dynamic",
            picked,
            _deepwhale("int8-dynamic", picked, lm_head=True),
        )
    )
    rows.append(
        ("torchao Int8WeightOnlyConfig", "int8", "torchao", _torchao("Int8WeightOnlyConfig"))
    )
    rows.append(
        (
            "torchao Int8DynamicActivationInt8WeightConfig",
            "int8-dynamic",
            "torchao",
            _torchao("Int8DynamicActivationInt8WeightConfig"),
        )
    )
    if dev == "cpu":
        rows.append(
            ("torch.ao quantize_dynamic (deprecated)", "int8-dynamic", "fbgemm", _quantize_dynamic)
        )
    return rows


def perplexities(log, device: str = "cpu") -> dict:
    """stories260K perplexity on the TinyStories sample: fp32, and each mode's ratio to it
    (the picked kernels of ``device``; the model stays fp32 there)."""
    from deepwhale.tokenizer import Tokenizer

    if not SAMPLE.exists():
        return {"skipped": f"{SAMPLE} not found"}
    tok = Tokenizer.from_pretrained(STORIES)
    seqs = [tok.encode(d) for d in read_documents(SAMPLE)]
    base = perplexity(load_model(STORIES, device=device), seqs)
    out = {"fp32": round(base, 4), "tokens": sum(len(s) - 1 for s in seqs)}
    for mode in Q.MODES:
        for lm_head in (False, True):
            m = Q.quantize_model(load_model(STORIES, device=device), mode, lm_head=lm_head)
            key = mode + ("+lm_head" if lm_head else "")
            out[key] = round(perplexity(m, seqs) / base, 4)
            if mode == "int8-dynamic" and not lm_head:  # through the one-row decode kernel
                out[key + " stepwise"] = round(perplexity(m, seqs, stepwise=True) / base, 4)
            log(f"perplexity ratio {key}: {out[key]}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default. One is the default because with two "
        "threads on a shared 2-core machine every op waits for a descheduled thread",
    )
    p.add_argument("--no-ppl", action="store_true", help="skip the stories260K perplexity")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = llama_58m()
    torch.manual_seed(0)
    base = CausalLM(config)
    base.init_weights(generator=torch.Generator().manual_seed(0))
    base = base.to(device=device, dtype=dtype).eval()
    fp_bytes = Q.weight_bytes(base), Q.weight_bytes(base, linear_only=True)
    fp_name = "bf16" if cuda else "fp32"
    models: dict[str, nn.Module] = {fp_name: base}
    rows = [
        {"name": fp_name, "mode": "none", "kernel": "-", "bytes_model": 1.0, "bytes_linear": 1.0}
    ]
    for name, mode, kernel, build in candidates(device):
        row = {"name": name, "mode": mode, "kernel": kernel}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = build(copy.deepcopy(base)).eval()
                decode_tok_s(model, config, device, 8)  # warm-up, and fails early if broken
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                model = None
        row["warnings"] = sorted(
            {f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught}
        )
        row["quantize_s"] = round(time.perf_counter() - t0, 2)
        if model is not None:
            row["bytes_model"] = round(Q.weight_bytes(model) / fp_bytes[0], 4)
            row["bytes_linear"] = round(Q.weight_bytes(model, linear_only=True) / fp_bytes[1], 4)
            models[name] = model
        rows.append(row)
        log(
            f"built {name} in {row['quantize_s']} s"
            + (f" ({row['error']})" if "error" in row else "")
        )
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            speeds[name].append(decode_tok_s(model, config, device, args.tokens))
            log(f"round {r + 1}: {name}: {speeds[name][-1]:.1f} tok/s")
    for row in rows:
        if row["name"] in speeds:
            row["tok_s"] = round(max(speeds[row["name"]]), 1)
            row["tok_s_rounds"] = [round(s, 1) for s in speeds[row["name"]]]
    dev = torch.device(device).type
    chosen, fastest = {}, {}
    for mode in Q.MODES:
        order = Q.KERNEL_ORDER.get((mode, dev), Q.KERNEL_ORDER[(mode, "*")])
        chosen[mode] = next(k for k in order if Q._probe(k, device) is None)
        ours = [
            r
            for r in rows
            if r["mode"] == mode
            and r["name"].startswith("deepwhale")
            and "lm_head" not in r["name"]
            and "tok_s" in r
        ]
        fastest[mode] = max(ours, key=lambda r: r["tok_s"])["kernel"] if ours else None
    result = {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "torchao": _version("torchao"),
        "params": sum(p.numel() for p in base.parameters()),
        "fp_weight_bytes": fp_bytes[0],
        "tokens": args.tokens,
        "rows": rows,
        "chosen": chosen,
        "fastest_measured": fastest,
    }
    if not args.no_ppl:
        result["perplexity_ratio"] = perplexities(log, device)
    if args.json:
        print(json.dumps(result))
    else:
        print(_table(result))
    return result


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, torchao {result['torchao']}, "
        f"{result['params'] / 1e6:.2f}M params, {result['tokens']} tokens per round",
        f"{'candidate':<52} {'tok/s':>7} {'bytes':>6} {'linear':>6}  note",
    ]
    for r in result["rows"]:
        note = r.get("error") or "; ".join(r.get("warnings", []))[:90]
        lines.append(
            f"{r['name']:<52} {r.get('tok_s', float('nan')):>7.1f} "
            f"{r.get('bytes_model', float('nan')):>6.3f} {r.get('bytes_linear', float('nan')):>6.3f}"
            f"  {note}"
        )
    lines.append(f"chosen: {result['chosen']}  fastest measured: {result['fastest_measured']}")
    if "perplexity_ratio" in result:
        lines.append(f"stories260K perplexity (ratio to fp32): {result['perplexity_ratio']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
