"""Atomic, resumable training checkpoints.

Layout: ``<out_dir>/checkpoints/step-00000100/`` holding ``model.pt`` (model state; under LoRA
only the trainable tensors and the buffers), ``optimizer.pt``, ``rng.pt`` (python, numpy, torch
and CUDA generator states) and ``state.json`` (step, data position, schedule, sizes of the other
files). A checkpoint is written into a hidden ``.tmp-step-...`` folder, every file is fsynced,
``state.json`` is written last, and the folder is renamed into place (atomic on POSIX). A folder is
*complete* only if its name is ``step-N``, its ``state.json`` parses with ``"complete": true`` and
every listed file has its recorded size, so a crash mid-save is never picked up by
``resume: auto``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE = "state.json"


class CheckpointNotFound(ValueError):
    """A checkpoint asked for by path is missing or incomplete."""


class NoUsableCheckpoint(CheckpointNotFound):
    """``resume: auto`` found checkpoints, but every one is incomplete or corrupt."""


def step_dir(root: Path, step: int) -> Path:
    """``root/step-000000NN``."""
    return root / f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every generator the loop touches: python ``random``, numpy's legacy global, torch CPU and
    CUDA (all devices)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the newest ``keep_last``.

    Args:
        root: the checkpoints folder (created).
        step: optimizer steps completed.
        model_state: tensors to restore into the model.
        optimizer_state: ``optimizer.state_dict()``.
        state: JSON-serialisable trainer state (data position, schedule, counters).
        keep_last: complete checkpoints to keep (older ones and stale temporaries are removed).

    Returns the final folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {
            "model.pt": {k: v.detach().to("cpu") for k, v in model_state.items()},
            "optimizer.pt": optimizer_state,
            "rng.pt": rng_state(),
        }
        sizes = {}
        for name, obj in files.items():
            _save(obj, tmp / name)
            sizes[name] = (tmp / name).stat().st_size
        meta = {**state, "step": step, "files": sizes, "complete": True}
        with open(tmp / STATE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a finished checkpoint, or None when it is one.

    Checks the name (``step-N``), that ``state.json`` parses with ``"complete": true``, and that
    every file it lists exists with its recorded size in bytes (a truncated DCP shard
    ``__R_0.distcp`` or ``model.pt`` is named with both sizes).
    """
    folder = Path(folder)
    if not STEP_DIR.match(folder.name) or not folder.is_dir():
        return "not a step-N folder"
    try:
        meta = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{STATE} is missing or unreadable (a save that did not finish)"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return f"{STATE} does not mark it complete"
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"{STATE} lists no files"
    for name, size in files.items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} is {actual} bytes, {STATE} records {size} (truncated or corrupt)"
    return None


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished checkpoint (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(folder) is None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints, and the temporaries that
    crashed saves left (those of processes no longer running)."""
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """Read a checkpoint: ``{"model", "optimizer", "rng", "state"}``.

    Raises:
        CheckpointNotFound: the folder is missing or incomplete.
    """
    if not is_complete(folder):
        raise CheckpointNotFound(
            f"{folder}: not a complete checkpoint (missing, half-written or not named step-N)"
        )
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))

    def load(name: str):
        # our own files; the RNG and optimizer states hold numpy / python objects
        return torch.load(folder / name, map_location="cpu", weights_only=False)

    return {
        "model": load("model.pt"),
        "optimizer": load("optimizer.pt"),
        "rng": load("rng.pt"),
        "state": state,
    }
