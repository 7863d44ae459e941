"""One short, prepared check of the CUDA paths: fp32 parity, bf16, compile, TensorRT, INT8, NCCL,
long-context prefill memory, and decode speed against transformers on the same GPU.

Each section is independent: a failure is recorded with its message and the rest still runs.
Prints one JSON line and, when ``$OUT`` is set, writes it to ``$OUT/gpu_check.json``.

Usage: ``python benchmarks/gpu_check.py [--quick]`` (skips cleanly without CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.checkpoint.io import load_model  # noqa: E402
from deepwhale.inference.engine import Engine  # noqa: E402
from deepwhale.inference.sampling import SamplingParams  # noqa: E402
from deepwhale.model.cache import make_cache  # noqa: E402
from deepwhale.model.flavours import flavour_config  # noqa: E402
from deepwhale.model.transformer import CausalLM  # noqa: E402

STORIES_GREEDY_PREFIX = "Once upon a time, there was a little girl named Lily."


def section(results: dict, name: str):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # record and go on
            results[name] = {
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-800:],
            }
        print(
            f"[{time.perf_counter() - t0:6.1f}s] {name}: {json.dumps(results[name])[:300]}",
            file=sys.stderr,
            flush=True,
        )
        return fn

    return wrap


@torch.inference_mode()
def decode_tps(model: CausalLM, n: int = 64, batch: int = 1) -> float:
    """Greedy decode tokens/s (all rows), after one warm-up pass; CUDA-synchronised."""
    prompt = torch.randint(3, 1000, (batch, 16), device="cuda")
    best = 0.0
    for _ in range(3):
        caches = make_cache(
            model.config, batch, 16 + n, dtype=next(model.parameters()).dtype, device="cuda"
        )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = model(prompt, caches=caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for i in range(n - 1):
            pos = torch.full((batch, 1), 16 + i, device="cuda")
            tok = model(tok, positions=pos, caches=caches)[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        best = max(best, batch * n / (time.perf_counter() - t0))
    return best


@torch.inference_mode()
def hf_tps(folder: Path, dtype, n: int = 64) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()
    prompt = torch.randint(3, 1000, (1, 16), device="cuda")
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the slower sections")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    tmp = Path(tempfile.mkdtemp())
    from inference import LLAMA_58M, V3_100M, random_checkpoint  # benchmarks/inference.py

    @section(res, "fp32_parity_cuda_vs_cpu")
    def _():
        out = {}
        for name, spec in (("llama", LLAMA_58M), ("v3", V3_100M)):
            cpu = random_checkpoint(spec, tmp / name)
            gpu = load_model(tmp / name, device="cuda")
            ids = torch.randint(0, 32000, (2, 64))
            with torch.inference_mode():
                a = cpu(ids)
                b = gpu(ids.cuda()).cpu()
            out[name] = (a - b).abs().max().item()
        return out

    @section(res, "bf16_stories")
    def _():
        m = DeepSeekModel.from_pretrained(DEFAULT_MODEL, device="cuda", dtype="bfloat16")
        text = m.generate("", max_new_tokens=60, temperature=0)
        ref = DeepSeekModel.from_pretrained(DEFAULT_MODEL, device="cpu")
        ids = torch.tensor([ref.tokenizer.encode("Once upon a time, there was a little girl")])
        with torch.inference_mode():
            a = ref(ids)
            b = m(ids.cuda()).float().cpu()
        return {
            "greedy_prefix_ok": text.startswith(STORIES_GREEDY_PREFIX),
            "text": text[:120],
            "bf16_vs_fp32_max_abs": (a - b).abs().max().item(),
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }

    @section(res, "decode_bf16_vs_hf")
    def _():
        out = {}
        for name in ("llama", "v3"):
            m = load_model(tmp / name, dtype=torch.bfloat16, device="cuda")
            ours = decode_tps(m)
            hf = hf_tps(tmp / name, torch.bfloat16)
            out[name] = {
                "ours_tps": ours,
                "hf_tps": hf,
                "ratio": ours / hf,
                "ours_batch32_tps": decode_tps(m, batch=32),
            }
        return out

    @section(res, "compile")
    def _():
        m = DeepSeekModel(load_model(tmp / "llama", dtype=torch.bfloat16, device="cuda"), None)
        eng = Engine(m.module, _Null(), max_batch_size=8, max_seq_len=256)
        prompts = [torch.randint(3, 1000, (16,)).tolist() for _ in range(8)]
        p = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True)
        eng.generate(prompts, p)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eager = eng.generate(prompts, p)
        torch.cuda.synchronize()
        t_eager = time.perf_counter() - t0
        eng.compile_decode()
        t0 = time.perf_counter()
        eng.generate(prompts, p)  # compiles
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        comp = eng.generate(prompts, p)
        torch.cuda.synchronize()
        t_comp = time.perf_counter() - t0
        same = [
            a.sequences[0].output_ids == b.sequences[0].output_ids
            for a, b in zip(eager, comp, strict=True)
        ]
        return {
            "eager_s": t_eager,
            "compiled_s": t_comp,
            "speedup": t_eager / t_comp,
            "compile_s": t_compile,
            "same_tokens": sum(same),
            "of": len(same),
        }

    @section(res, "tensorrt")
    def _():
        m = DeepSeekModel(load_model(DEFAULT_MODEL, device="cuda"), None)
        try:
            m.enable_tensorrt(precision="fp16")
            return {"enabled": True}
        except RuntimeError as e:
            return {"enabled": False, "message": str(e)}

    @section(res, "int8_cuda")
    def _():
        from deepwhale.inference import quantize as q

        m = load_model(tmp / "llama", dtype=torch.bfloat16, device="cuda")
        base = decode_tps(m)
        qm = q.quantize_model(
            load_model(tmp / "llama", dtype=torch.bfloat16, device="cuda"), "int8"
        )
        return {
            "bf16_tps": base,
            "int8_tps": decode_tps(qm),
            "kernel": getattr(qm, "quantization", None),
        }

    @section(res, "nccl")
    def _():
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
        x = torch.ones(1024, device="cuda")
        dist.all_reduce(x)
        dist.destroy_process_group()
        return {
            "all_reduce_ok": bool(x[0].item() == 1.0),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }

    @section(res, "long_prefill_bf16")
    def _():
        out = {}
        lengths = (4096, 16384) if args.quick else (4096, 16384, 32768)
        for n in lengths:
            config = flavour_config("debug-v3", max_position_embeddings=n + 8)
            model = CausalLM(config).to("cuda", torch.bfloat16).eval()
            model.init_weights()
            eng = Engine(model, None, max_batch_size=1, max_seq_len=n + 8, prefill_chunk=2048)
            ids = torch.randint(0, 512, (n,), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng._prefill(ids, 0)
            torch.cuda.synchronize()
            out[str(n)] = {
                "seconds": time.perf_counter() - t0,
                "peak_mem_bytes": torch.cuda.max_memory_allocated(),
            }
        return out

    line = json.dumps({k: v for k, v in res.items()})
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(line + "\n")


class _Null:
    eos_token_ids = frozenset()

    def detokenizer(self, prompt_ids=None, skip_special_tokens=True):
        return self

    def add(self, token_id):
        return ""

    def flush(self):
        return ""


if __name__ == "__main__":
    main()
