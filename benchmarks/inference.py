"""Inference benchmark: deepwhale against transformers (and llama.cpp where installed), side by side.

Every figure is measured in this one run on the same weights; goals are ratios, never absolute
timings. Models (random weights unless noted, saved in HF layout so every engine loads the same
files):

* ``llama-58m``  LLaMA layout, 58M parameters (the size PLATFORM.md measured llama.cpp on);
* ``v3-100m``    DeepSeek-V3 shape (MLA + DeepSeekMoE, sigmoid ``noaux_tc``), ~100M parameters;
* ``stories260K`` the bundled pretrained model.

Reports (``--json`` prints one line): batch-1 greedy decode tokens/s for deepwhale and
transformers ``generate()`` and their ratio; llama.cpp F32 decode on the same LLaMA weights
(exported with the ``gguf`` package) when ``llama-cpp-python`` imports; engine throughput at 1, 8
and 32 concurrent sequences; INT8 weight bytes, perplexity and decode speed ratios; MLA cache
bytes per token against an MHA model of the same shape; prefill time and peak memory at 4K, 16K
and 32K tokens; and batch-1 decode against the memory-bandwidth limit.

Usage: ``python benchmarks/inference.py [--json] [--quiet] [--tokens 64] [--skip-long]``
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (cli.main)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.checkpoint.io import load_model, save_model  # noqa: E402
from deepwhale.inference.engine import Engine  # noqa: E402
from deepwhale.inference.sampling import SamplingParams  # noqa: E402
from deepwhale.model.cache import cache_bytes_per_token, make_cache  # noqa: E402
from deepwhale.model.config import ModelConfig  # noqa: E402
from deepwhale.model.flavours import FLAVOURS, flavour_config  # noqa: E402
from deepwhale.model.transformer import CausalLM  # noqa: E402

LLAMA_58M = FLAVOURS["bench-llama-58m"]
V3_100M = FLAVOURS["bench-v3-134m"]


class Progress:
    """Prints step names with elapsed seconds to stderr unless ``--quiet``."""

    def __init__(self, quiet: bool, total: int) -> None:
        self.quiet, self.total, self.n, self.t0 = quiet, total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        if not self.quiet:
            el = time.perf_counter() - self.t0
            eta = el / self.n * (self.total - self.n) if self.n else 0
            print(f"[{self.n}/{self.total} {el:5.0f}s eta {eta:4.0f}s] {what}", file=sys.stderr)


def random_checkpoint(spec: dict, folder: Path, seed: int = 0) -> CausalLM:
    """Build a random model from ``spec`` (HF config keys), save it to ``folder``, return it."""
    model = CausalLM(ModelConfig(**spec)).eval()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    save_model(model, folder)
    return model


@torch.no_grad()
def ours_decode_tps(
    model: CausalLM, prompt: torch.Tensor, n: int, repeats: int = 2, compiled: bool = False
) -> float:
    """Batch-1 greedy decode tokens/s: prefill, then ``n - 1`` single-token steps.

    With ``compiled``, the decode step is ``torch.compile``d (static cache shapes), as
    ``DeepSeekModel.compile()`` does; the compile itself happens in the warm-up pass.
    """
    caches = make_cache(model.config, 1, prompt.shape[1] + n)
    for c in caches:
        c.static_len = compiled

    def step(token, pos):
        return model(token, positions=pos, caches=caches)[:, -1].argmax(-1, keepdim=True)

    fn = torch.compile(step, dynamic=False) if compiled else step
    best = 0.0
    for _ in range(repeats + 1):  # first pass warms up (and compiles)
        t0 = time.perf_counter()
        logits = model(prompt, caches=caches, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(n - 1):
            token = fn(token, torch.tensor([[prompt.shape[1] + i]]))
        best = max(best, n / (time.perf_counter() - t0))
    return best


@torch.inference_mode()
def hf_decode_tps(folder: Path, prompt: torch.Tensor, n: int, repeats: int = 2) -> float | None:
    """The same measurement with transformers ``generate()`` (greedy, exactly ``n`` tokens)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    best = 0.0
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        best = max(best, n / (time.perf_counter() - t0))
    del hf
    gc.collect()
    return best


def llamacpp_decode_tps(model: CausalLM, folder: Path, prompt: list[int], n: int) -> float | None:
    """llama.cpp F32 decode on the same LLaMA weights, or None when llama-cpp-python is absent."""
    try:
        import llama_cpp  # noqa: F401

        from deepwhale.checkpoint.gguf import export_gguf
    except ImportError:
        return None
    path = export_gguf(folder, folder / "model-f32.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    best = 0.0
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        out = 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out += 1
            if out >= n:
                break
        best = max(best, out / (time.perf_counter() - t0))
    return best


def batch_throughput(model: CausalLM, sizes=(1, 8, 32), n: int = 32) -> dict[str, float]:
    """Engine generated tokens/s with ``b`` concurrent greedy sequences (16-token prompts)."""
    out = {}
    eng = Engine(model, _NullTokenizer(), max_batch_size=max(sizes), max_seq_len=16 + n + 1)
    g = torch.Generator().manual_seed(0)
    for b in sizes:
        prompts = [torch.randint(3, 1000, (16,), generator=g).tolist() for _ in range(b)]
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        eng.generate(prompts[:1], params)  # warm-up
        t0 = time.perf_counter()
        reqs = eng.generate(prompts, params)
        dt = time.perf_counter() - t0
        out[str(b)] = sum(r.num_generated for r in reqs) / dt
    return out


class _NullTokenizer:
    """Token-only stand-in for random-weight models: text deltas are empty."""

    eos_token_ids = frozenset()

    def detokenizer(self, prompt_ids=None, skip_special_tokens=True):
        return self

    def add(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def read_bandwidth_gbs() -> float:
    """Measured memory read bandwidth, GB/s: summing a 1 GiB fp32 tensor (best of 5)."""
    x = torch.ones(256 * 1024 * 1024)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_token(model: CausalLM) -> int:
    """Bytes of weights read per decode step: everything but the embedding table (one row)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or name == "model.embed_tokens.weight":
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    if model.config.tie_word_embeddings:
        e = model.model.embed_tokens.weight
        total += e.numel() * e.element_size()
    return total


def _prefill_child(n_tokens: int, chunk: int, conn) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = flavour_config("debug-v3", max_position_embeddings=max(32768, n_tokens + 8))
    model = CausalLM(config).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 512, (n_tokens,), generator=torch.Generator().manual_seed(1))
    eng = Engine(model, None, max_batch_size=1, max_seq_len=n_tokens + 8, prefill_chunk=chunk)
    base = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    eng._prefill(ids, 0)
    dt = time.perf_counter() - t0
    peak = _vm_kib("VmHWM")  # this process's peak RSS (ru_maxrss would include the parent's)
    conn.send({"seconds": dt, "peak_mem_bytes": peak, "peak_over_loaded_bytes": peak - base})


def _vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def long_prefill(lengths=(4096, 16384, 32768), chunk: int = 1024) -> dict[str, dict]:
    """Prefill time and peak RSS for the debug DeepSeek-V3 model, one fresh process per length."""
    ctx = mp.get_context("spawn")
    out = {}
    for n in lengths:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_prefill_child, args=(n, chunk, child))
        p.start()
        out[str(n)] = parent.recv()
        p.join()
    return out


def int8_figures(llama_folder: Path, prompt: torch.Tensor, n: int, fp32_tps: float) -> dict:
    """INT8 weight-bytes, perplexity and decode-speed ratios (None when quantization is absent)."""
    try:
        from deepwhale.eval.perplexity import perplexity
        from deepwhale.inference import quantize as q
    except ImportError:
        return {
            "int8_weight_bytes_ratio": None,
            "int8_ppl_ratio": None,
            "int8_decode_speed_ratio": None,
        }
    fp32 = load_model(llama_folder)
    before = q.weight_bytes(fp32)
    int8 = q.quantize_model(load_model(llama_folder), "int8")
    speed = ours_decode_tps(int8, prompt, n) / fp32_tps
    ratio = q.weight_bytes(int8) / before
    stories = DeepSeekModel.from_pretrained(DEFAULT_MODEL)
    text = REPO.parent / "shared/data/corpus/en/tinystories/tinystories_sample.txt"
    ppl_ratio = None
    if text.exists():
        ids = stories.tokenizer.encode(text.read_text(encoding="utf-8"))[:512]
        ppl_fp32 = perplexity(stories.module, [ids])
        ppl_int8 = perplexity(q.quantize_model(load_model(DEFAULT_MODEL), "int8"), [ids])
        ppl_ratio = ppl_int8 / ppl_fp32
    return {
        "int8_weight_bytes_ratio": ratio,
        "int8_ppl_ratio": ppl_ratio,
        "int8_decode_speed_ratio": speed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--skip-long", action="store_true", help="skip the 4K/16K/32K prefill")
    args = ap.parse_args()
    step = Progress(args.quiet, 9)
    res: dict = {"threads": torch.get_num_threads(), "tokens": args.tokens}
    n = args.tokens
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        step("llama-58m: deepwhale vs transformers")
        llama = random_checkpoint(LLAMA_58M, tmp / "llama")
        res["decode_tps"] = ours_decode_tps(llama, prompt, n)
        res["hf_decode_tps"] = hf_decode_tps(tmp / "llama", prompt, n)
        res["ratio_vs_hf"] = res["hf_decode_tps"] and res["decode_tps"] / res["hf_decode_tps"]
        res["decode_tps_compiled"] = ours_decode_tps(llama, prompt, n, compiled=True)
        res["compiled_ratio_vs_hf"] = res["hf_decode_tps"] and (
            res["decode_tps_compiled"] / res["hf_decode_tps"]
        )
        step("llama-58m: llama.cpp")
        res["llamacpp_decode_tps"] = llamacpp_decode_tps(
            llama, tmp / "llama", prompt[0].tolist(), n
        )
        res["ratio_vs_llamacpp"] = (
            res["llamacpp_decode_tps"] and res["decode_tps"] / res["llamacpp_decode_tps"]
        )
        res["compiled_ratio_vs_llamacpp"] = (
            res["llamacpp_decode_tps"] and res["decode_tps_compiled"] / res["llamacpp_decode_tps"]
        )
        step("memory bandwidth")
        bw = read_bandwidth_gbs()
        wb = weight_bytes_per_token(llama)
        res["read_bandwidth_gbs"] = bw
        res["weight_bytes_per_token"] = wb
        res["bandwidth_fraction"] = wb * res["decode_tps"] / 1e9 / bw
        res["bandwidth_fraction_compiled"] = wb * res["decode_tps_compiled"] / 1e9 / bw
        step("v3-100m: deepwhale vs transformers")
        v3 = random_checkpoint(V3_100M, tmp / "v3")
        res["v3_params"] = sum(p.numel() for p in v3.parameters())
        res["v3_decode_tps"] = ours_decode_tps(v3, prompt, n)
        res["v3_hf_decode_tps"] = hf_decode_tps(tmp / "v3", prompt, n)
        res["v3_ratio_vs_hf"] = res["v3_hf_decode_tps"] and (
            res["v3_decode_tps"] / res["v3_hf_decode_tps"]
        )
        cb = cache_bytes_per_token(v3.config, dtype_bytes=2)
        res["mla_cache_bytes_per_token"] = cb["cache"]
        res["mha_cache_bytes_per_token"] = cb["mha"]
        v32 = ModelConfig(**FLAVOURS["bench-v32-134m"])  # + DeepSeek-V3.2's indexer keys
        res["v32_cache_bytes_per_token"] = cache_bytes_per_token(v32, dtype_bytes=2)["cache"]
        step("stories260K: deepwhale vs transformers")
        stories = load_model(DEFAULT_MODEL)
        sp = torch.tensor([[1, 403, 407, 261, 378]])
        res["stories_decode_tps"] = ours_decode_tps(stories, sp, n)
        res["stories_hf_decode_tps"] = hf_decode_tps(DEFAULT_MODEL, sp, n)
        step("engine throughput at 1/8/32 sequences (llama-58m)")
        res["batch_throughput_tps"] = batch_throughput(llama)
        res["batch32_over_batch1"] = (
            res["batch_throughput_tps"]["32"] / res["batch_throughput_tps"]["1"]
        )
        step("int8")
        res.update(int8_figures(tmp / "llama", prompt, n, res["decode_tps"]))
        del llama, v3
        gc.collect()
    step("long-context prefill")
    if not args.skip_long:
        res["prefill"] = long_prefill()
        res["prefill_32k_peak_mem_bytes"] = res["prefill"]["32768"]["peak_mem_bytes"]
    step("done")
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
