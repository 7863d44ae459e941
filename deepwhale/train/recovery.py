"""Fault recovery: heartbeats, the restart count, the recovery report and a fault-injection hook.

A run restarted by ``torchrun --max-restarts N`` (or by any supervisor) resumes from its newest
complete checkpoint (see :meth:`deepwhale.train.trainer.Trainer._resume`). This module measures
how long that took. Rank 0 writes ``<out_dir>/heartbeat.json`` (``{"step", "time", "pid"}``,
``time`` in seconds since the epoch) atomically after every optimizer step; the restarted
process reads the dead run's last heartbeat before it writes its own, and after its first
optimizer step writes ``<out_dir>/recovery.json`` and logs one line::

    recovered from step 8 in 6.41 s (detection+restart 3.02 s, startup 2.10 s, rendezvous
    0.05 s, build 0.71 s, checkpoint load 0.18 s, first step 0.35 s)

The parts add up to the total, all in seconds of wall time:

* ``detection_restart_s``: the dead run's last heartbeat -> this process's start (the rest of
  the step it died in, torchrun noticing the dead worker every ``--monitor-interval`` seconds,
  stopping the others, the agent's re-rendezvous and ``fork``/``exec``);
* ``startup_s``: process start -> process-group init begins (interpreter, imports, config);
* ``rendezvous_s``: ``init_process_group`` and the device mesh (0 on one process);
* ``build_s``: data, model, parallel plans, optimizer and choosing the checkpoint;
* ``checkpoint_load_s``: reading the checkpoint (DCP reshards it);
* ``first_step_s``: the first resumed optimizer step.

The process start time comes from ``/proc/self/stat`` and ``/proc/uptime`` (10 ms resolution),
else from ``psutil``, else the time this module was imported.

The restart count is ``TORCHELASTIC_RESTART_COUNT``, which torchrun's elastic agent sets in every
worker (0 on the first attempt). References: PyTorch elastic agent docs ("Environment
variables"), torchtitan's checkpoint manager.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEARTBEAT = "heartbeat.json"
RECOVERY = "recovery.json"
FAULT_ENV = "DEEPWHALE_FAULT_INJECT"
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"

_IMPORTED_AT = time.time()  # the last fallback for the process start time

log = logging.getLogger(__name__)


def restart_count() -> int:
    """How many times torchrun's agent restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``;
    0 outside torchrun or on the first attempt)."""
    try:
        return int(os.environ.get(RESTART_ENV, "0"))
    except ValueError:
        return 0


def process_start_time() -> float:
    """When this process started, in seconds since the epoch.

    Linux: ``starttime`` (clock ticks after boot, field 22 of ``/proc/self/stat``) placed on the
    wall clock with ``/proc/uptime``; else ``psutil.Process().create_time()``; else the time this
    module was imported.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in (...) may hold spaces
        ticks = int(fields[19])  # field 22 of the whole line
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil missing or unsupported here
        return _IMPORTED_AT


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then ``os.replace``).

    Unlike :func:`deepwhale.atomic.write_json` it does not touch the process umask, which a
    background checkpoint thread may be creating files under at the same moment.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_heartbeat(out_dir: Path, step: int) -> None:
    """Write ``out_dir/heartbeat.json`` = ``{"step", "time" (s since the epoch), "pid"}`` atomically
    (rank 0 calls this after every optimizer step)."""
    beat = {"step": step, "time": time.time(), "pid": os.getpid()}
    _write_json(Path(out_dir) / HEARTBEAT, beat)


def read_heartbeat(out_dir: Path) -> dict[str, Any] | None:
    """The last heartbeat a run in ``out_dir`` wrote, or None (none, or unreadable)."""
    try:
        data = json.loads((Path(out_dir) / HEARTBEAT).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and "time" in data else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class FaultInjection:
    """A testing hook: ``DEEPWHALE_FAULT_INJECT="rank=1,step=7"`` makes rank 1 ``SIGKILL`` itself
    just before it runs optimizer step 7 (after 6 completed steps), on the first attempt only
    (``TORCHELASTIC_RESTART_COUNT`` = 0), so the restarted job runs through. With ``,mode=raise``
    the rank raises ``RuntimeError("injected fault ...")`` instead (a crash in our code rather
    than a dead process). Never set it in production.

    Attributes:
        rank: the global rank that dies.
        step: the optimizer step (1-based) it dies before.
        mode: ``"kill"`` (SIGKILL) or ``"raise"``.
    """

    rank: int
    step: int
    mode: str = "kill"

    @classmethod
    def from_env(cls) -> FaultInjection | None:
        """The hook from ``DEEPWHALE_FAULT_INJECT``, or None when unset.

        Raises:
            ValueError: a malformed value (the message shows the expected form).
        """
        raw = os.environ.get(FAULT_ENV, "").strip()
        if not raw:
            return None
        try:
            kv = dict(item.split("=", 1) for item in raw.split(","))
            mode = kv.get("mode", "kill")
            if mode not in ("kill", "raise"):
                raise ValueError(mode)
            return cls(rank=int(kv.get("rank", 0)), step=int(kv["step"]), mode=mode)
        except (ValueError, KeyError):
            raise ValueError(
                f"{FAULT_ENV}={raw!r}: expected 'rank=R,step=K[,mode=kill|raise]' (kill rank R "
                "before step K)"
            ) from None

    def maybe_kill(self, rank: int, next_step: int) -> None:
        """``SIGKILL`` this process if it is the chosen rank, about to run the chosen step, on the
        first attempt."""
        if rank == self.rank and next_step == self.step and restart_count() == 0:
            if self.mode == "raise":
                raise RuntimeError(f"injected fault ({FAULT_ENV}) before step {next_step}")
            log.warning("%s: rank %d kills itself before step %d", FAULT_ENV, rank, next_step)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RecoveryClock:
    """Wall times (seconds since the epoch) of one restarted process's way back to training.

    Attributes:
        heartbeat: the dead run's last heartbeat (None when it wrote none).
        process_start: this process's start.
        rendezvous_start, rendezvous_end: around process-group init (both = ``build_start`` on
            one process).
        load_start, load_end: around the checkpoint load.
    """

    heartbeat: dict[str, Any] | None
    process_start: float
    rendezvous_start: float
    rendezvous_end: float
    load_start: float = 0.0
    load_end: float = 0.0

    def report(self, step: int, checkpoint: Path | None, first_step_end: float) -> dict[str, Any]:
        """The recovery figures (see the module docstring), seconds; ``total_s`` runs from the last
        heartbeat (from the process start when there is none, ``detection_restart_s`` None)."""
        load_start = self.load_start or self.rendezvous_end
        load_end = self.load_end or load_start
        hb = self.heartbeat
        detect = self.process_start - float(hb["time"]) if hb else None
        origin = float(hb["time"]) if hb else self.process_start
        return {
            "step": step,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "restart_count": restart_count(),
            "total_s": first_step_end - origin,
            "detection_restart_s": detect,
            "startup_s": self.rendezvous_start - self.process_start,
            "rendezvous_s": self.rendezvous_end - self.rendezvous_start,
            "build_s": load_start - self.rendezvous_end,
            "checkpoint_load_s": load_end - load_start,
            "first_step_s": first_step_end - load_end,
            "last_heartbeat": hb,
            "process_start": self.process_start,
            "time": first_step_end,
        }


# the parts of a recovery's seconds, in order: (report key, log label)
BREAKDOWN = (
    ("detection_restart_s", "detection+restart"),
    ("startup_s", "startup"),
    ("rendezvous_s", "rendezvous"),
    ("build_s", "build"),
    ("checkpoint_load_s", "checkpoint load"),
    ("first_step_s", "first step"),
)


def describe(rec: dict[str, Any]) -> str:
    """The one log line of a :meth:`RecoveryClock.report`."""
    parts = [(label, rec[key]) for key, label in BREAKDOWN]
    since = "" if rec["detection_restart_s"] is not None else " since process start"
    detail = ", ".join(f"{n} {v:.2f} s" for n, v in parts if v is not None)
    return f"recovered from step {rec['step']} in {rec['total_s']:.2f} s{since} ({detail})"


def write_recovery(out_dir: Path, rec: dict[str, Any]) -> Path:
    """Write ``out_dir/recovery.json`` atomically; returns its path."""
    path = Path(out_dir) / RECOVERY
    _write_json(path, rec)
    return path
