"""Rate limits in SQLite: atomic across processes (the limiter alone, then two real
`deepwhale serve` processes on one data folder sharing one key's per-minute window)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepwhale.serve.auth import KeyStore
from deepwhale.serve.ratelimit import RateLimiter
from tests.serve.conftest import wait_for_health

NAME = "stories260K"


def _hammer(path: str, key_id: str, limit: int, n: int, start) -> int:
    """In a child process: ``n`` checks as fast as possible; returns how many were allowed."""
    limiter = RateLimiter(path)
    start.wait()
    return sum(limiter.check(key_id, limit) is None for _ in range(n))


def test_limiter_is_atomic_across_processes(tmp_path):
    path = str(tmp_path / "limits.sqlite")
    RateLimiter(path)  # create the file before the race
    ctx = multiprocessing.get_context("spawn")  # no torch state copied into the children
    limit, procs, each = 37, 4, 20
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(procs) as pool:
            jobs = [
                pool.apply_async(_hammer, (path, "key_a", limit, each, start)) for _ in range(procs)
            ]
            start.set()
            allowed = [j.get(timeout=60) for j in jobs]
    assert sum(allowed) == limit, allowed  # 80 tries, exactly the limit got through
    assert RateLimiter(path).used("key_a") == limit
    assert RateLimiter(path).check("key_b", limit) is None  # keys have their own windows


def test_limiter_window_slides(tmp_path):
    now = [1000.0]
    limiter = RateLimiter(tmp_path / "limits.sqlite", clock=lambda: now[0])
    assert [limiter.check("k", 3) for _ in range(3)] == [None] * 3
    now[0] += 20
    assert limiter.check("k", 3) == 40  # the oldest of the three expires at 1060
    now[0] += 40  # 1060: the first three are out of the window
    assert limiter.check("k", 3) is None and limiter.used("k") == 1
    assert limiter.check("k", None) is None and limiter.used("k") == 1  # unlimited: not stored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_server_processes_share_one_limit(tmp_path):
    """Two `deepwhale serve` processes on one --data-dir: a key limited to N requests per minute
    gets exactly N successes through both together; the rest are 429 with a JSON body and
    Retry-After."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    limit = 5
    key, record = KeyStore(tmp_path / "keys.sqlite").create("shared", "user", rate_limit=limit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs, bases = [], []
    try:
        for _ in range(2):
            port = _free_port()
            cmd = [sys.executable, "-m", "deepwhale.cli", "serve", "--port", str(port)]
            cmd += ["--data-dir", str(tmp_path), "--batch-size", "1", "--threads", "1"]
            log = open(tmp_path / f"serve-{port}.log", "wb")  # noqa: SIM115 (closed with the test)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            bases.append(f"http://127.0.0.1:{port}")
        for proc, base in zip(procs, bases, strict=True):
            wait_for_health(base, timeout=90, alive=lambda p=proc: p.poll() is None)
        headers = {"Authorization": f"Bearer {key}"}

        def call(i: int):
            return httpx.get(f"{bases[i % 2]}/v1/models", headers=headers, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(14)))
        ok = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code == 429]
        assert len(ok) == limit and len(refused) == 14 - limit, [r.status_code for r in answers]
        assert {r.url.port for r in ok} | {r.url.port for r in refused} == {
            int(b.rsplit(":", 1)[1]) for b in bases
        }
        for r in refused:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert record.id in r.json()["error"]["message"]
            assert 1 <= int(r.headers["Retry-After"]) <= 60
        # another key is not affected by this one's window, on either server
        other, _ = KeyStore(tmp_path / "keys.sqlite").create("other", "user", rate_limit=1)
        for base, want in zip(bases, (200, 429), strict=True):
            r = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {other}"})
            assert r.status_code == want
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_a_locked_limiter_database_is_a_503_not_a_crash(tmp_path):
    """Another process holding the write lock past the limiter's timeout: the request is
    refused with a JSON 503 and Retry-After (fail closed), never let through uncounted."""
    import sqlite3

    pytest.importorskip("fastapi")
    from deepwhale.serve.middleware import AuthMiddleware

    store = KeyStore(tmp_path / "keys.sqlite")
    key, _ = store.create("k", "user", rate_limit=5)
    limiter = RateLimiter(tmp_path / "limits.sqlite", timeout_s=0.05)
    auth = AuthMiddleware(None, store, limiter)
    scope = {
        "type": "http",
        "path": "/v1/models",
        "headers": [(b"authorization", b"Bearer " + key.encode())],
    }
    assert auth.check(scope) is None  # counted
    holder = sqlite3.connect(tmp_path / "limits.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        response = auth.check(dict(scope))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert b"rate_limiter_unavailable" in response.body
    assert auth.check(dict(scope)) is None and limiter.used(store.list()[0].id) == 2
