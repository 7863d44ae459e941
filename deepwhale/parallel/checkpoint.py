"""Sharded, resharding checkpoints for parallel runs, on torch Distributed Checkpoint (DCP).

Layout: ``<out_dir>/checkpoints/step-00000100/`` holds DCP's files (``.metadata`` and one
``__R_0.distcp`` per writing rank) plus ``state.json`` (step, data position, schedule, the layout
it was saved under, and the size of every file). Every rank writes its shards into the hidden
``.tmp-step-...-dcp`` folder; after a barrier rank 0 writes ``state.json`` last and renames the
folder into place, so a checkpoint is complete only when :func:`deepwhale.train.checkpoint.
is_complete` finds every listed file at its size; a crash mid-save is never resumed from.
:func:`async_save_dcp` does the same with ``dcp.async_save``: the files are written by a
background thread while training goes on, and the folder is renamed into place only once every
rank's part is on disk.

The model and optimizer states go through ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict`` / ``get_optimizer_state_dict``), whose keys are the single-device FQNs
(the HF checkpoint keys) whatever the wrapping (DDP, FSDP2, TP DTensors, pipeline stages that keep
their layers' global names, expert-parallel shards that keep their experts' global names). So a
checkpoint saved under one layout loads under any other, and on one process (``no_dist``): DCP
reads only the pieces each rank needs. RNG states are stored per rank (``rng/rank{R}``); a rank
that did not exist at save time takes rank 0's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deepwhale.train import checkpoint as ckpt

METADATA = ".metadata"


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` holds a DCP checkpoint (its ``.metadata`` file)."""
    return (Path(folder) / METADATA).is_file()


def _to_bytes(obj: Any) -> torch.Tensor:
    """A picklable object (RNG states, compression residuals) as a uint8 tensor ``(nbytes,)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _from_bytes(t: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(t.numpy().tobytes()), map_location="cpu", weights_only=False)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _prepare(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None,
) -> tuple[Path, Path, dict[str, Any]]:
    """Clear the temporary folder (rank 0; a barrier follows) and gather this rank's state dict.

    Returns ``(tmp, final, state_dict)``."""
    root = Path(root)
    final = ckpt.step_dir(root, step)
    tmp = root / f".tmp-{final.name}-dcp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    sd: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "rng": {f"rank{rank}": _to_bytes(ckpt.rng_state())},
    }
    if extra:
        sd["extra"] = {f"rank{rank}": _to_bytes(extra)}
    return tmp, final, sd


def _finalize(tmp: Path, final: Path, step: int, state: dict[str, Any], keep_last: int) -> None:
    """Rank 0, once every rank's shards and DCP's ``.metadata`` are on disk: write
    ``state.json`` (with every file's size in bytes) last, rename the folder into place, prune."""
    sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    meta = {**state, "step": step, "format": "dcp", "files": sizes, "complete": True}
    with open(tmp / ckpt.STATE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    ckpt.prune(final.parent, keep_last)


def save_dcp(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save checkpoint ``step`` of a (possibly parallel) run; every rank calls this.

    Args:
        root: the checkpoints folder (shared by all ranks).
        step: optimizer steps completed.
        model: the wrapped model (DDP, FSDP2, TP or a pipeline stage).
        optimizer: its optimizer.
        state: JSON-serialisable trainer state (the same on every rank; rank 0 writes it).
        keep_last: complete checkpoints to keep.
        extra: this rank's own state (e.g. gradient-compression residuals, any picklable
            object), stored under ``extra.rank{R}`` and returned by :func:`load_dcp`.

    Returns the final folder. Raises ``OSError`` / ``CheckpointException`` on write errors.
    """
    tmp, final, sd = _prepare(root, step, model, optimizer, extra)
    dcp.save(sd, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        _finalize(tmp, final, step, state, keep_last)
    _barrier()
    return final


class AsyncSave:
    """A checkpoint being written in the background by :func:`async_save_dcp`.

    Attributes:
        folder: the final ``step-N`` folder it will appear as.
    """

    def __init__(self, future, folder: Path, finalize) -> None:
        self.folder = folder
        self._future = future
        self._finalize = finalize  # rank 0 only, else None
        self._done = False

    def poll(self) -> bool:
        """Finish the save if the background write is done (see :meth:`wait`); never blocks.
        The trainer polls after every step, so a checkpoint becomes visible at most one step
        after its files are written. Returns whether it is finished."""
        if not self._done and self._future.done():
            self.wait()
        return self._done

    def wait(self) -> Path:
        """Block until this rank's shards are written; on rank 0 then write ``state.json`` and
        rename the folder into place (at most once).

        Returns the final folder. Raises what the background write raised (``OSError``,
        ``CheckpointException``).
        """
        if not self._done:
            self._future.result()
            if self._finalize is not None:
                self._finalize()
            self._done = True
        return self.folder


def async_save_dcp(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    extra: dict[str, Any] | None = None,
    process_group=None,
) -> AsyncSave:
    """Start saving checkpoint ``step`` with ``torch.distributed.checkpoint.async_save``; every
    rank calls this and training goes on while a background thread writes the files.

    The state is staged (copied to CPU memory: one extra copy of this rank's model and optimizer
    shards) before this returns, so the next optimizer step may change the live tensors. DCP's
    planning and gathering collectives run in the background thread on ``process_group``, which
    must be a group separate from the training collectives (a gloo group of all ranks; torchtitan
    does the same). The checkpoint is visible only after :meth:`AsyncSave.wait` on rank 0 has
    written ``state.json`` and renamed the folder, exactly as :func:`save_dcp` does; rank 0's
    write ends only after every rank's shards and ``.metadata`` are on disk (DCP gathers each
    rank's write result to the coordinator before it writes ``.metadata``). Call ``wait`` on every
    rank before the next save and at the end of training.

    Args: as :func:`save_dcp`, plus ``process_group`` (the background group).

    Returns an :class:`AsyncSave`. Reference: PyTorch "Asynchronous Saving with Distributed
    Checkpoint (DCP)" recipe.
    """
    tmp, final, sd = _prepare(root, step, model, optimizer, extra)
    future = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=process_group)
    state = json.loads(json.dumps(state))  # a snapshot: the caller's dict moves on

    def finalize() -> None:
        _finalize(tmp, final, step, state, keep_last)

    return AsyncSave(future, final, finalize if _rank() == 0 else None)


def _stored_keys(folder: Path) -> set[str]:
    reader = dcp.FileSystemReader(str(folder))
    return set(reader.read_metadata().state_dict_metadata)


def has_key_suffix(folder: Path, suffix: str) -> bool:
    """Whether DCP checkpoint ``folder`` stores a key ending in ``suffix`` (e.g. an optimizer
    state entry only some runs keep); False for a folder without DCP metadata."""
    try:
        return any(k.endswith(suffix) for k in _stored_keys(Path(folder)))
    except (OSError, ValueError, RuntimeError, FileNotFoundError):
        return False


def load_dcp(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    want_extra: bool = False,
) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), resharding to the current layout.

    Works on one process without a process group as well as under ``torchrun``.

    Args:
        folder: a complete ``step-N`` folder.
        model: the model, wrapped as for training.
        optimizer: its optimizer (None: weights only).
        want_extra: also return this rank's ``extra`` state (None when it was not saved, e.g.
            a rank that did not exist at save time).

    Returns:
        ``{"state": state.json contents, "extra": this rank's extra state or None}``.

    Raises:
        CheckpointNotFound: ``folder`` is not a complete DCP checkpoint, or it does not match the
            model (a missing or wrongly shaped tensor; the message names it).
    """
    folder = Path(folder)
    if not ckpt.is_complete(folder) or not is_dcp(folder):
        raise ckpt.CheckpointNotFound(
            f"{folder}: not a complete distributed checkpoint (missing, half-written or not "
            "named step-N)"
        )
    no_dist = not dist.is_initialized()
    rank = _rank()
    stored = _stored_keys(folder)
    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    rng_key = f"rank{rank}" if f"rng.rank{rank}" in stored else "rank0"
    if f"rng.{rng_key}" in stored:
        sd["rng"] = {
            rng_key: torch.empty(_tensor_numel(folder, f"rng.{rng_key}"), dtype=torch.uint8)
        }
    extra_key = f"extra.rank{rank}"
    if want_extra and extra_key in stored:
        sd["extra"] = {
            f"rank{rank}": torch.empty(_tensor_numel(folder, extra_key), dtype=torch.uint8)
        }
    try:
        dcp.load(sd, checkpoint_id=str(folder), no_dist=no_dist)
    except (RuntimeError, ValueError, KeyError) as e:  # CheckpointException is a BaseException
        raise ckpt.CheckpointNotFound(
            f"{folder}: checkpoint does not match this model ({str(e).splitlines()[0][:300]})"
        ) from None
    except BaseException as e:  # noqa: BLE001 - DCP wraps per-rank failures
        if type(e).__name__ != "CheckpointException":
            raise
        raise ckpt.CheckpointNotFound(
            f"{folder}: checkpoint does not match this model ({str(e).splitlines()[0][:300]})"
        ) from None
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    if "rng" in sd:
        ckpt.set_rng_state(_from_bytes(sd["rng"][rng_key]))
    state = json.loads((folder / ckpt.STATE).read_text(encoding="utf-8"))
    extra = _from_bytes(sd["extra"][f"rank{rank}"]) if "extra" in sd else None
    return {"state": state, "extra": extra}


def _tensor_numel(folder: Path, key: str) -> int:
    reader = dcp.FileSystemReader(str(folder))
    md = reader.read_metadata().state_dict_metadata[key]
    return int(md.size.numel())


def export_hf(folder: Path, model_config, out: Path) -> Path:
    """Write an HF folder (``config.json`` + safetensors) from the weights of a DCP checkpoint.

    Runs on one process (no collectives): a fresh single-device model is allocated on CPU and
    DCP reads every piece of every tensor into it.

    Args:
        folder: a complete DCP ``step-N`` folder.
        model_config: the run's :class:`~deepwhale.model.config.ModelConfig`.
        out: the output folder (written atomically by :func:`deepwhale.checkpoint.io.save_model`).

    Raises:
        CheckpointNotFound: an incomplete folder or one that does not match the config.
    """
    from deepwhale.checkpoint.io import save_model
    from deepwhale.model.transformer import CausalLM

    model = CausalLM(model_config)
    # plain state_dict(): no collectives, this runs on rank 0 alone
    sd = {"model": model.state_dict()}
    if not ckpt.is_complete(Path(folder)) or not is_dcp(Path(folder)):
        raise ckpt.CheckpointNotFound(f"{folder}: not a complete distributed checkpoint")
    dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
    model.load_state_dict(sd["model"], strict=True)
    save_model(model, Path(out))
    return Path(out)
