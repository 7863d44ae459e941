"""Run ``deepwhale train`` under a real ``torchrun`` (gloo on CPU) and read what it wrote."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The child environment: this checkout first on the path, one thread per process."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # pytorch/pytorch#135712, see PLATFORM.md
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def torchrun(
    nproc: int,
    args: list[str],
    timeout: float = 240,
    extra: list[str] | None = None,
    environ: dict[str, str] | None = None,
    entry: tuple[str, ...] = ("deepwhale", "train"),
    coverage: bool = True,
):
    """``torchrun --nproc-per-node nproc [EXTRA] -m deepwhale train ARGS`` (``entry``: the module
    and its leading arguments), with ``environ`` added to the child environment; returns the
    CompletedProcess. ``coverage=False`` leaves the workers unmeasured (coverage's subprocess
    patch costs them a good part of their time; use it where other launches run the same code)."""
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
        *entry,
        *args,
    ]
    child = {**env(), **(environ or {})}
    if not coverage:
        child.pop("COVERAGE_PROCESS_CONFIG", None)
    return subprocess.run(
        cmd,
        env=child,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )


def write_config(path: Path, data: dict) -> Path:
    """Write a YAML config."""
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def losses(out_dir: Path) -> list[float]:
    """Per-step training losses from ``metrics.csv``."""
    rows = list(csv.DictReader((Path(out_dir) / "metrics.csv").open()))
    return [float(r["loss"]) for r in rows]
