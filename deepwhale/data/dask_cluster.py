"""Start a real ``dask.distributed`` cluster on this machine: one ``dask scheduler`` process
and N ``dask worker`` processes, as a user would on each host of a cluster.

Used by the tests and ``benchmarks/data_pipeline.py --scaling`` to run the pipeline on Beam's
Dask runner (:mod:`deepwhale.data.dask_runner`) against separate processes, not Dask's
in-process ``LocalCluster``. On a multi-machine cluster, run ``dask scheduler`` on one host and
``dask worker tcp://HOST:8786`` on the others (from a checkout or install of the same
deepwhale version), and pass ``--dask_client_address tcp://HOST:8786``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_dask_cluster(
    n_workers: int = 2,
    threads: int = 1,
    log_dir: str | os.PathLike | None = None,
    pythonpath: str | os.PathLike | None = None,
    timeout_s: float = 90.0,
) -> Iterator[str]:
    """Run a scheduler and ``n_workers`` worker processes on 127.0.0.1; yields the address
    (``tcp://127.0.0.1:PORT``) once every worker has registered, and stops them all on exit.

    Args:
        n_workers: worker processes (``--no-nanny``, ``threads`` threads each).
        log_dir: where ``scheduler.log`` / ``worker<i>.log`` go (None: discarded).
        pythonpath: put first on the processes' ``PYTHONPATH`` (a source checkout), so the
            workers import the same deepwhale as this process.
        timeout_s: seconds to wait for the scheduler and the workers.

    Raises:
        RuntimeError: ``distributed`` is not installed, or the cluster did not come up in
            ``timeout_s`` (the log folder, if any, holds the processes' output).
    """
    try:
        from distributed import Client
    except ImportError as e:
        raise RuntimeError(f"a Dask cluster needs dask and distributed ({e})") from None
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), env.get("PYTHONPATH")) if p
        )
    logs = Path(log_dir) if log_dir is not None else None

    def spawn(args: list, name: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb") if logs is not None else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args, "--no-dashboard"],
            env=env,
            cwd=pythonpath,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    procs = [spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port)], "scheduler")]
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(f"dask scheduler did not start on {addr}") from None
                time.sleep(0.2)
        for i in range(n_workers):
            procs.append(
                spawn(["worker", addr, "--nthreads", str(threads), "--no-nanny"], f"worker{i}")
            )
        with Client(addr, timeout=timeout_s) as client:
            try:
                client.wait_for_workers(n_workers, timeout=max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RuntimeError(f"{n_workers} dask worker(s) did not register") from None
        yield addr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
