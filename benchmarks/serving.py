"""Serving benchmark: concurrent streaming clients against a live ``deepwhale serve`` on 127.0.0.1.

For each concurrency level (1, 8, 32 by default) it runs ``concurrency × rounds`` streaming
``POST /v1/completions`` requests (each client sends its next request when the previous one has
finished), then the same requests straight into the engine in this process, from the same number
of threads, with the same batch size. Both sides generate exactly ``--tokens`` tokens per request
(``ignore_eos``, greedy), so the work is identical.

Reported per level: p50/p99 request latency and time to first token (seconds), output tokens/s,
errors, and ``http_over_engine`` = served tokens/s ÷ engine tokens/s, measured in this one run.
The goal is >= 0.9 at 8 clients. The server runs in a child process (its own GIL), as it would in
production; the clients are asyncio + httpx in this process. Both share this machine's cores, as
in any single-host benchmark (vLLM's ``benchmark_serving`` has the same caveat).

Models: ``stories260K`` (the bundled pretrained model; so small that the HTTP layer dominates, the
worst case for overhead) and ``llama-25m`` (random weights with the same tokenizer, a LLaMA of
hidden 512 × 8 layers; closer to where per-token compute dominates). ``--model DIR`` serves any
checkpoint folder with a tokenizer instead.

Usage: ``python benchmarks/serving.py [--json] [--quiet] [--clients 1,8,32] [--tokens 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (cli.main)

import httpx  # noqa: E402
import torch  # noqa: E402
from rich.progress import Progress  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepwhale.api import DEFAULT_MODEL, DeepSeekModel  # noqa: E402
from deepwhale.checkpoint.io import save_model  # noqa: E402
from deepwhale.inference.engine import Engine  # noqa: E402
from deepwhale.inference.sampling import SamplingParams  # noqa: E402
from deepwhale.model.flavours import flavour_config  # noqa: E402
from deepwhale.model.transformer import CausalLM  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily wanted to",
    "One day, Tom and his mom",
    "The sun was shining and",
    "There was a big tree",
    "Ben liked to play with",
    "In the park, a girl",
]


def llama_25m(folder: Path) -> Path:
    """A random-weight LLaMA (hidden 512, 8 layers, intermediate 1536) with the bundled
    stories260K tokenizer (vocab 512), written as an HF folder; returns the folder."""
    torch.manual_seed(0)
    config = flavour_config(
        "debug-llama",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
    )
    model = CausalLM(config)
    save_model(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (DEFAULT_MODEL / name).exists():
            shutil.copy(DEFAULT_MODEL / name, folder / name)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``deepwhale serve --no-auth`` in a child process; a context manager."""

    def __init__(
        self, model: Path, batch_size: int, max_seq_len: int, threads: int | None = None
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        code = "from deepwhale.cli import main; main()"
        args = ["serve", "--model", str(model), "--port", str(self.port), "--no-auth"]
        args += ["--batch-size", str(batch_size), "--max-seq-len", str(max_seq_len)]
        if threads:
            args += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWHALE_HOME": tempfile.mkdtemp()}

        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start in 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return {"p50": round(pick(0.50), 4), "p99": round(pick(0.99), 4)}


async def _client(
    http: httpx.AsyncClient, base: str, name: str, prompts: list[str], tokens: int, out: dict, tick
) -> None:
    for prompt in prompts:
        body = {
            "model": name,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        ttft, usage = None, None
        try:
            async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and ttft is None:
                        ttft = time.perf_counter() - t0
                    if event.get("usage"):
                        usage = event["usage"]
            if usage is None:
                raise RuntimeError("no usage chunk")
            out["latency"].append(time.perf_counter() - t0)
            out["ttft"].append(ttft)
            out["tokens"] += usage["completion_tokens"]
        except Exception as e:  # counted, not fatal: the error count is a reported figure
            out["errors"] += 1
            out.setdefault("error_examples", []).append(str(e)[:200])
        tick()


async def _serve_phase(base: str, name: str, jobs: list[list[str]], tokens: int, tick) -> dict:
    out = {"latency": [], "ttft": [], "tokens": 0, "errors": 0}
    limits = httpx.Limits(max_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(http, base, name, j, tokens, out, tick) for j in jobs))
        out["wall_s"] = time.perf_counter() - t0
    return out


def serve_phase(base: str, name: str, jobs: list[list[str]], tokens: int, tick) -> dict:
    """Run the clients' request lists concurrently against the server; raw figures."""
    return asyncio.run(_serve_phase(base, name, jobs, tokens, tick))


def engine_phase(model: DeepSeekModel, jobs: list[list[str]], tokens: int, tick) -> dict:
    """The same requests straight into an engine with one slot per client (so at most as many
    run at once as over HTTP), submitted together: continuous batching refills a slot as soon as
    a request finishes, as the next request of that client would. Tokens/s only."""
    prompts = [model.encode_prompt(p) for job in jobs for p in job]
    engine = Engine(
        model.module, model.tokenizer, max_batch_size=len(jobs), max_seq_len=tokens + 64
    )
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    engine.generate(prompts[:1], params)  # warm-up
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    for _ in reqs:
        tick()
    return {
        "latency": [],
        "ttft": [],
        "tokens": sum(r.num_generated for r in reqs),
        "errors": 0,
        "wall_s": wall,
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(raw: dict) -> dict:
    out = {"output_tokens_per_s": round(raw["tokens"] / raw["wall_s"], 1)}
    if raw["latency"] or raw["errors"]:
        out = {
            "requests": len(raw["latency"]),
            "errors": raw["errors"],
            **out,
            "latency_s": _percentiles(raw["latency"]),
            "ttft_s": _percentiles([t for t in raw["ttft"] if t is not None]),
            "server_cpu_s": round(raw["server_cpu_s"], 2),
            "client_cpu_s": round(raw["client_cpu_s"], 2),
            "wall_s": round(raw["wall_s"], 2),
        }
        if raw.get("error_examples"):
            out["error_examples"] = raw["error_examples"][:3]
    return out


def bench_model(
    folder: Path,
    name: str,
    levels: list[int],
    tokens: int,
    rounds: int,
    quiet: bool,
    server_threads: int | None = None,
) -> dict:
    """All concurrency levels for one model: served and engine-direct figures and their ratio."""
    batch = max(levels)
    max_seq_len = tokens + 64
    jobs_for = {
        c: [[PROMPTS[(i * rounds + k) % len(PROMPTS)] for k in range(rounds)] for i in range(c)]
        for c in levels
    }
    total = 2 * sum(c * rounds for c in levels)
    results = {}
    with Progress(disable=quiet, transient=True) as progress:
        task = progress.add_task(f"{name}: requests", total=total)
        tick = lambda: progress.advance(task)  # noqa: E731
        with Server(folder, batch, max_seq_len, server_threads) as server:
            serve_phase(server.base, name, [[PROMPTS[0]]], tokens, lambda: None)  # warm-up
            served = {}
            for c in levels:
                server_cpu, client_cpu = _cpu_s(server.proc.pid), time.process_time()
                served[c] = serve_phase(server.base, name, jobs_for[c], tokens, tick)
                served[c]["server_cpu_s"] = _cpu_s(server.proc.pid) - server_cpu
                served[c]["client_cpu_s"] = time.process_time() - client_cpu
        model = DeepSeekModel.from_pretrained(folder, device="cpu")
        model.module.eval()
        direct = {c: engine_phase(model, jobs_for[c], tokens, tick) for c in levels}
    for c in levels:
        s, d = _summary(served[c]), _summary(direct[c])
        results[str(c)] = {
            "served": s,
            "engine": d,
            "http_over_engine": round(s["output_tokens_per_s"] / d["output_tokens_per_s"], 3),
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--model", type=Path, help="serve this checkpoint folder instead")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument(
        "--server-threads", type=int, default=0, help="`serve --threads` (0: torch default)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    out = {
        "clients": levels,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "server_threads": args.server_threads or torch.get_num_threads(),
        "engine_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = (
            {args.model.name: args.model}
            if args.model
            else {"stories260K": DEFAULT_MODEL, "llama-25m": llama_25m(Path(tmp) / "llama-25m")}
        )
        for name, folder in models.items():
            out[name] = bench_model(
                folder,
                name,
                levels,
                args.tokens,
                args.rounds,
                args.quiet,
                args.server_threads or None,
            )
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{'model':<12} {'clients':>7} {'served tok/s':>12} {'engine tok/s':>12} {'ratio':>6} "
        f"{'p50 s':>7} {'p99 s':>7} {'TTFT p50':>8} {'errors':>6}"
    )
    for name in models:
        for c, r in out[name].items():
            s = r["served"]
            print(
                f"{name:<12} {c:>7} {s['output_tokens_per_s']:>12} "
                f"{r['engine']['output_tokens_per_s']:>12} {r['http_over_engine']:>6} "
                f"{s['latency_s']['p50']:>7} {s['latency_s']['p99']:>7} "
                f"{s['ttft_s']['p50']:>8} {s['errors']:>6}"
            )


if __name__ == "__main__":
    main()
