"""Run a HumanEval program in a subprocess sandbox, and the unbiased pass@k estimator.

:func:`run_program` runs ``prompt + completion + test + check(entry_point)`` (see
:func:`humaneval_program`) in a child ``python -I -c PRELUDE`` process:

- cwd is a fresh temporary directory, deleted afterwards; ``TMPDIR``/``HOME`` point into it;
- ``-I`` (isolated mode): no ``PYTHON*`` environment variables, no user site-packages, the
  script's directory is not on ``sys.path``; the environment is reduced to ``PATH``, ``HOME``,
  ``TMPDIR`` and ``LANG``;
- memory: ``RLIMIT_AS`` (default 1 GiB) set by the prelude before the program runs, so an
  allocation past it raises ``MemoryError``; ``RLIMIT_CORE`` is 0;
- wall time: the parent waits ``timeout_s`` (default 10 s) and then kills the child's whole
  process group (the child is started in a new session), so grandchildren die too;
- network: the prelude replaces ``socket.socket``, ``socket.create_connection``,
  ``socket.socketpair`` and ``socket.fromfd`` with a function raising ``PermissionError``.

What is NOT isolated: the file system (the program can read, and write wherever the user
can, by absolute path; only its cwd is a temp dir), the ``_socket`` C module and ``os``-level
calls (``os.system``, ``subprocess`` running ``curl``) can still reach the network, CPU count
and other processes are visible. This follows the spirit of the HumanEval harness
(``human_eval/execution.py``, Chen et al. 2021), which also only guards in-process; run
untrusted model code inside a container or VM as well.

:func:`pass_at_k` is the unbiased estimator of Chen et al. 2021, "Evaluating Large Language
Models Trained on Code", eq. 1: ``pass@k = E[1 - C(n - c, k) / C(n, k)]`` over problems, with
``n`` samples of which ``c`` pass. With greedy decoding ``n = k = 1`` and pass@1 is the
fraction of problems passed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

# Runs in the child before the program: memory limit, no core files, no socket creation.
# argv: [-c, memory_bytes]; the program arrives on stdin.
_PRELUDE = """\
import resource, socket, sys
_mem = int(sys.argv[1])
if _mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the deepwhale sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
_src = sys.stdin.read()
del resource, socket, _mem, _no_network
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_src, "<program>", "exec"), _globals)
"""


@dataclass(frozen=True)
class RunResult:
    """One sandboxed run: ``status`` is ``passed``, ``failed`` or ``timeout``.

    ``returncode`` is the child's exit status (None on timeout); ``stderr`` its last 2,000
    characters (the traceback of a failed assertion, a ``MemoryError``, ...).
    """

    status: str
    returncode: int | None
    stderr: str

    @property
    def passed(self) -> bool:
        """True when the program exited with status 0 within the time limit."""
        return self.status == "passed"


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs for one problem (``human_eval/execution.py``, Chen et al. 2021).

    The completion is appended to the prompt (the function signature and docstring), then the
    problem's ``test`` code (which defines ``check``) and ``check(entry_point)``.
    """
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_program(program: str, *, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> RunResult:
    """Run ``program`` (Python source) in the sandbox described in the module docstring.

    ``timeout_s``: wall-clock seconds before the whole process group is killed (SIGKILL).
    ``memory_bytes``: the child's ``RLIMIT_AS`` (0: no limit). Raises ``ValueError`` for a
    non-positive ``timeout_s`` or a negative ``memory_bytes``; the program's own errors are
    a ``failed`` result, never an exception here.
    """
    if timeout_s <= 0:
        raise ValueError(f"sandbox timeout_s must be > 0, got {timeout_s}")
    if memory_bytes < 0:
        raise ValueError(f"sandbox memory_bytes must be >= 0, got {memory_bytes}")
    with tempfile.TemporaryDirectory(prefix="deepwhale-sandbox-") as cwd:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "TMPDIR": cwd}
        env["LANG"] = "C.UTF-8"
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _PRELUDE, str(memory_bytes)],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(program.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunResult("timeout", None, "")
        finally:
            _kill_group(proc)  # grandchildren left behind by a program that exited
        text = err.decode(errors="replace")[-2000:]
        return RunResult("passed" if proc.returncode == 0 else "failed", proc.returncode, text)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its session), ignoring one already gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, eq. 1).

    ``n`` samples were drawn, ``c`` of them passed; ``k <= n``. Computed as the product
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` for numerical stability (the paper's Figure 3).
    Raises ``ValueError`` unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
