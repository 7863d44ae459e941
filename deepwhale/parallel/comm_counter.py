"""Count the bytes this process hands to ``torch.distributed`` collectives, per mesh dimension.

A measuring tool for benchmarks and tests, off by default. With ``DEEPWHALE_COUNT_COMM=1`` in the
environment the parallel trainer (:class:`~deepwhale.parallel.trainer.ParallelTrainer`) installs a
:class:`CommCounter`, labels its process groups with their mesh dimension (``dp``, ``dp_shard``,
``tp``, ``pp``, ``ep``) and writes ``out_dir/comm/rank{R}.json`` after every optimizer step: the
bytes of that step per dimension and operation, the gradient-compression hook's own byte count,
the step's seconds, and once the optimizer has state, this rank's parameter, gradient and
optimizer-state bytes counted from the live tensors plus the process's peak RSS.
``DEEPWHALE_COUNT_COMM=trace`` also lists every call of the step as ``(dim, op, bytes)`` (that is
how the planner's TP formula was checked). The wrappers stay installed for the life of the
process; counting costs a signature bind per collective.

How it counts: :meth:`CommCounter.install` wraps the public collectives of ``torch.distributed``
(``all_reduce``, ``all_gather``, ``all_gather_into_tensor``, ``all_gather_single``,
``reduce_scatter``, ``reduce_scatter_tensor``, ``reduce_scatter_single``, ``all_to_all``,
``all_to_all_single``, ``broadcast``, ``send``/``isend``, ``recv``/``irecv``) and the functional
collectives DTensor uses (``torch.distributed._functional_collectives``: ``all_reduce``,
``all_gather_tensor``, ``all_gather_single``, ``reduce_scatter_tensor``,
``reduce_scatter_single``, ``all_to_all_single`` and their ``_autograd`` forms). Each call adds the
**payload**, the bytes of its input tensor(s) (``numel x element_size``; the planner's
:class:`~deepwhale.parallel.planner.Collective` ``payload_bytes`` uses the same definition), to
``(dimension, operation)``; a call made from inside another counted call (a wrapper calling a
wrapper) is not counted twice. ``recv`` counts the receive buffer under ``recv``, so ``send`` alone
is what this rank puts on the wire.

What it cannot see: collectives issued from C++ without passing through these Python functions.
The one that matters is DDP's built-in all-reduce of gradient buckets, so under counting the
trainer registers torch's Python ``allreduce_hook`` (``default_hooks.allreduce_hook``: divide by the
world size, then ``dist.all_reduce``) on DDP models that have no compression hook — the same
averaged gradient, now visible to the counter.

Thread safety: comm hooks and PowerSGD's future callbacks run on other threads, so the counts
are updated under a lock and the nesting guard is thread-local.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import resource
import threading
from collections import defaultdict
from pathlib import Path

import torch

#: The environment variable that makes the parallel trainer count.
ENV = "DEEPWHALE_COUNT_COMM"

# torch.distributed function -> (operation, payload argument)
DIST_OPS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_gather": ("all_gather", "tensor"),
    "all_gather_into_tensor": ("all_gather", "input_tensor"),
    "all_gather_single": ("all_gather", "input_tensor"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "all_to_all": ("all_to_all", "input_tensor_list"),
    "all_to_all_single": ("all_to_all", "input"),
    "broadcast": ("broadcast", "tensor"),
    "send": ("send", "tensor"),
    "isend": ("send", "tensor"),
    "recv": ("recv", "tensor"),
    "irecv": ("recv", "tensor"),
}
# torch.distributed._functional_collectives function -> operation (payload argument ``self``)
FUNCOL_OPS: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_gather_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "all_gather_tensor_autograd": "all_gather",
    "all_gather_single_autograd": "all_gather",
    "reduce_scatter_tensor_autograd": "reduce_scatter",
    "reduce_scatter_single_autograd": "reduce_scatter",
    "all_to_all_single_autograd": "all_to_all",
}


def enabled() -> bool:
    """True when ``DEEPWHALE_COUNT_COMM`` is set to something other than ``0`` or empty
    (``trace`` also records every call, see :attr:`CommCounter.trace`)."""
    return os.environ.get(ENV, "0") not in ("", "0")


def tensor_bytes(x) -> int:
    """Bytes of a tensor, a DTensor's local shard, or a list/tuple of them (0 for anything
    else)."""
    if isinstance(x, list | tuple):
        return sum(tensor_bytes(t) for t in x)
    if not isinstance(x, torch.Tensor):
        return 0
    local = getattr(x, "_local_tensor", x)  # DTensor -> this rank's shard
    return local.numel() * local.element_size()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, bytes (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes(params, optimizer=None) -> dict[str, int]:
    """This rank's ``params``, ``grads`` and ``optimizer`` state bytes, counted from the live
    tensors (DTensors by their local shard; grads that are None count 0; every tensor in the
    optimizer's ``state``, AdamW's ``exp_avg``, ``exp_avg_sq`` and scalar ``step``)."""
    params = list(params)
    out = {
        "params": sum(tensor_bytes(p) for p in params),
        "grads": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": 0,
    }
    if optimizer is not None:
        for st in optimizer.state.values():
            out["optimizer"] += sum(tensor_bytes(v) for v in st.values())
    return out


class CommCounter:
    """Payload bytes and calls of this process's collectives, per ``(dimension, operation)``.

    Use :meth:`label` to name process groups (unlabelled groups count as ``world`` when they
    are the default group, else ``other``), :meth:`install` to start counting (it is also a
    context manager), :meth:`take` to read and reset the counts of one step.

    Attributes:
        trace: None, or a list of ``(dim, op, bytes)`` of every call since the last :meth:`take`
            (``DEEPWHALE_COUNT_COMM=trace`` turns it on in the trainer; it goes into the step
            records as ``trace``).
        bytes: ``{dim: {op: payload bytes}}`` since the last :meth:`take`.
        calls: ``{dim: {op: calls}}`` since the last :meth:`take`.
    """

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._lock = threading.Lock()
        self._local = threading.local()
        self._saved: list[tuple[object, str, object]] = []
        self.trace: list[tuple[str, str, int]] | None = None  # (dim, op, bytes) per call if set

    # ------------------------------------------------------------------ labels
    def label(self, group, dim: str) -> None:
        """Count collectives on ``group`` (a ProcessGroup, a 1-D DeviceMesh or a group name)
        under ``dim``. Groups of one rank are ignored (nothing is sent)."""
        if group is None:
            return
        if hasattr(group, "get_group"):  # a DeviceMesh
            if group.size() == 1:
                return
            group = group.get_group()
        if not isinstance(group, str) and group.size() == 1:
            return
        name = group if isinstance(group, str) else group.group_name
        self.labels[name] = dim

    def _group_name(self, group, funcol: bool) -> str:
        import torch.distributed as dist

        try:
            if funcol:
                from torch.distributed import _functional_collectives as fc

                return fc._resolve_group_name(group, "")
            if group is None:
                group = dist.group.WORLD
            return group.group_name
        except Exception:  # noqa: BLE001 - an odd group form counts as "other", never fails
            return "?"

    def dim_of(self, group_name: str) -> str:
        """The label of a group name: its :meth:`label`, ``world`` or ``other``."""
        import torch.distributed as dist

        if group_name in self.labels:
            return self.labels[group_name]
        world = dist.group.WORLD
        if world is not None and group_name == world.group_name:
            return "world"
        return "other"

    # ------------------------------------------------------------------ counting
    def record(self, op: str, group_name: str, nbytes: int) -> None:
        """Add one call of ``op`` with ``nbytes`` of payload on ``group_name``."""
        dim = self.dim_of(group_name)
        with self._lock:
            self.bytes[dim][op] += nbytes
            self.calls[dim][op] += 1
            if self.trace is not None:
                self.trace.append((dim, op, nbytes))

    def take(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{"bytes": {dim: {op: n}}, "calls": {dim: {op: n}}}`` since the last call; resets."""
        with self._lock:
            out = {
                "bytes": {d: dict(v) for d, v in self.bytes.items()},
                "calls": {d: dict(v) for d, v in self.calls.items()},
            }
            if self.trace is not None:
                out["trace"] = self.trace
                self.trace = []
            self.bytes.clear()
            self.calls.clear()
        return out

    def _wrap(self, fn, op: str, payload_arg: str, funcol: bool):
        sig = inspect.signature(fn)
        if payload_arg not in sig.parameters or "group" not in sig.parameters:
            return None  # another torch with other names: leave it alone
        counter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            local = counter._local
            if getattr(local, "depth", 0):
                return fn(*args, **kwargs)
            try:
                bound = sig.bind(*args, **kwargs)
                nbytes = tensor_bytes(bound.arguments.get(payload_arg))
                name = counter._group_name(bound.arguments.get("group"), funcol)
                counter.record(op, name, nbytes)
            except TypeError:  # bad arguments: let torch raise its own error
                pass
            local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = 0

        wrapper.__wrapped_by_comm_counter__ = True
        return wrapper

    def install(self) -> CommCounter:
        """Wrap the collectives (see the module docstring); idempotent. Returns ``self``."""
        if self._saved:
            return self
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from torch.distributed import _functional_collectives as fc

        for name, (op, arg) in DIST_OPS.items():
            fn = getattr(dist, name, None)
            if fn is None or getattr(fn, "__wrapped_by_comm_counter__", False):
                continue
            w = self._wrap(fn, op, arg, funcol=False)
            if w is None:
                continue
            self._saved.append((dist, name, fn))
            setattr(dist, name, w)
            if name in ("isend", "irecv") and getattr(c10d, name, None) is fn:
                # P2POp checks ``op in [isend, irecv]`` against c10d's own names
                self._saved.append((c10d, name, fn))
                setattr(c10d, name, w)
        for name, op in FUNCOL_OPS.items():
            fn = getattr(fc, name, None)
            if fn is None or getattr(fn, "__wrapped_by_comm_counter__", False):
                continue
            w = self._wrap(fn, op, "self", funcol=True)
            if w is None:
                continue
            self._saved.append((fc, name, fn))
            setattr(fc, name, w)
        return self

    def uninstall(self) -> None:
        """Put the original functions back."""
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()

    def __enter__(self) -> CommCounter:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


class StepRecorder:
    """What the parallel trainer writes under counting: one JSON file per rank,
    ``out_dir/comm/rank{R}.json`` = ``{"rank", "world_size", "layout", "dims": {dim: group
    size}, "steps": [{"step", "seconds", "bytes", "calls", "hook"}], "memory"}``, rewritten after
    every step (``memory``: :func:`state_bytes` at the first step that has optimizer state, plus
    ``peak_rss`` updated every step)."""

    def __init__(self, counter: CommCounter, path: Path, meta: dict) -> None:
        self.counter = counter
        self.path = Path(path)
        self.data = {**meta, "steps": [], "memory": {}}

    def begin(self) -> None:
        """Drop what was counted outside steps (evaluation, checkpoints, setup)."""
        self.counter.take()

    def end(self, step: int, seconds: float, hook: dict | None, memory: dict | None) -> None:
        """Record step ``step`` (1-based, completed) and rewrite the file."""
        rec = {"step": step, "seconds": seconds, **self.counter.take()}
        if hook is not None:
            rec["hook"] = hook
        self.data["steps"].append(rec)
        if memory is not None and not self.data["memory"]:
            self.data["memory"] = dict(memory)
        self.data["memory"]["peak_rss"] = peak_rss_bytes()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data), encoding="utf-8")
        tmp.replace(self.path)


def read_records(out_dir: Path) -> list[dict]:
    """The ``comm/rank*.json`` files of a run, in rank order."""
    files = sorted(Path(out_dir, "comm").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def step_bytes(record: dict, dim: str, op: str | None = None, skip: int = 1) -> float:
    """Median over steps (after the first ``skip``) of a rank's payload bytes per step in
    ``dim`` (one ``op``, or all)."""
    import statistics

    vals = []
    for s in record["steps"][skip:] or record["steps"]:
        d = s["bytes"].get(dim, {})
        vals.append(d.get(op, 0) if op else sum(d.values()))
    return statistics.median(vals) if vals else 0.0


def planner_estimate(record: dict, param_bytes: int = 4, optim_bytes_per_param: int = 8):
    """:func:`deepwhale.parallel.planner.estimate` for the run a rank's record describes: its
    model, layout, micro-batch, sequence length and microbatches (``layout.microbatches`` or
    ``grad_accum``), fp32 by default (params, grads and activations of ``param_bytes``).
    FSDP2 reduce-scatters every microbatch only when there is one (the trainer syncs on the
    last)."""
    import dataclasses

    from deepwhale.model.config import ModelConfig
    from deepwhale.parallel import planner
    from deepwhale.parallel.layout import GradCompression, ParallelLayout

    lay = dict(record["layout"])
    lay["grad_compression"] = GradCompression(**lay["grad_compression"])
    layout = ParallelLayout(**lay)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in record["model"].items() if k in fields})
    m = layout.microbatches or record["grad_accum"]
    return planner.estimate(
        config,
        layout,
        record["micro_batch_size"],
        record["seq_len"],
        m,
        param_bytes=param_bytes,
        grad_bytes=param_bytes,
        optim_bytes_per_param=optim_bytes_per_param,
        activation_bytes=param_bytes,
        fsdp_sync_every_microbatch=m == 1,
    )
