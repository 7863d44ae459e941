"""Shared by the distributed benchmarks: run ``deepwhale train`` under a real ``torchrun`` (gloo on
CPU) with the communication counter on, and read what the run wrote.

The children get this checkout first on ``PYTHONPATH`` (an editable install elsewhere must not be
imported instead), one thread each, and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
(pytorch/pytorch#135712, see PLATFORM.md).
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO.parent / "shared" / "data" / "corpus" / "en" / "tinyshakespeare" / "input.txt"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(count: bool = True) -> dict[str, str]:
    """The children's environment (see the module docstring); ``DEEPWHALE_COUNT_COMM=1`` when
    ``count``."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if count:
        e["DEEPWHALE_COUNT_COMM"] = "1"
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def train(
    nproc: int,
    config: dict,
    folder: Path,
    parallel: str | None = None,
    timeout: float = 600,
    count: bool = True,
    environ: dict[str, str] | None = None,
    extra: list[str] | None = None,
):
    """Write ``config`` to ``folder/cfg.yaml`` and run ``torchrun --nproc-per-node nproc [EXTRA]
    -m deepwhale train -c cfg.yaml [--parallel PARALLEL]`` with ``environ`` added to the
    children's environment; returns the CompletedProcess."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--monitor-interval=0.1",
        *(extra or []),
        "-m",
        "deepwhale",
        "train",
        "-c",
        str(cfg),
        *(["--parallel", parallel] if parallel else []),
    ]
    return subprocess.run(
        cmd,
        env={**child_env(count), **(environ or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )


def metrics(out_dir: Path) -> list[dict]:
    """Rows of ``metrics.csv`` (rank 0)."""
    with (Path(out_dir) / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def text_slice(tmp: Path, chars: int, text: Path = TEXT) -> Path:
    """The first ``chars`` characters of ``text`` as ``tmp/text.txt``."""
    out = tmp / "text.txt"
    out.write_text(text.read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return out


def failure(stderr: str) -> str:
    """The line that says why a run failed: the trainer's ``error: rank R/W: ...`` line, else the
    last exception line, else the tail of stderr."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    for pick in (
        lambda x: x.startswith("what():"),  # gloo's own reason, before the peers' resets
        lambda x: x.startswith("error: rank") and "Connection reset" not in x,
        lambda x: x.startswith("error: rank"),
        lambda x: "Error:" in x and not x.startswith("torch.distributed.elastic"),
    ):
        hits = [x for x in lines if pick(x)]
        if hits:
            return hits[-1][:500]
    return " | ".join(lines[-3:])[:500]
