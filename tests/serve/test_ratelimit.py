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

from deepwhale.serve.audit import iter_rows, verify
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


def _serve(tmp_path, port: int, *extra: str) -> subprocess.Popen:
    """`deepwhale serve` on ``port`` over the data folder ``tmp_path`` (output to a log file)."""
    cmd = [sys.executable, "-m", "deepwhale.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(tmp_path), "--batch-size", "1", "--threads", "1", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / f"serve-{port}.log", "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _burst(httpx, bases: list[str], key: str, n: int) -> list:
    """``n`` concurrent ``GET /v1/models`` with ``key``, round-robin over ``bases``."""
    headers = {"Authorization": f"Bearer {key}"}
    with ThreadPoolExecutor(6) as pool:
        return list(
            pool.map(
                lambda i: httpx.get(
                    f"{bases[i % len(bases)]}/v1/models", headers=headers, timeout=30
                ),
                range(n),
            )
        )


def _assert_limited(answers: list, limit: int, key_id: str) -> None:
    codes = [r.status_code for r in answers]
    assert codes.count(200) == limit and codes.count(429) == len(answers) - limit, codes
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert key_id in r.json()["error"]["message"]
            assert 1 <= int(r.headers["Retry-After"]) <= 60


def _assert_one_chain(home, n_models: int) -> None:
    """The processes wrote one intact audit chain, a row for each ``/v1/models`` call."""
    result = verify(home / "audit.sqlite")
    assert result.ok, result
    rows = [r for r in iter_rows(home / "audit.sqlite") if r["route"] == "/v1/models"]
    assert len(rows) == n_models


def test_two_server_processes_share_one_limit(tmp_path):
    """Two `deepwhale serve` processes on one --data-dir: a key limited to N requests per minute
    gets exactly N successes through both together; the rest are 429 with a JSON body and
    Retry-After."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    limit = 5
    key, record = KeyStore(tmp_path / "keys.sqlite").create("shared", "user", rate_limit=limit)
    ports = [_free_port(), _free_port()]
    procs = [_serve(tmp_path, port) for port in ports]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for proc, base in zip(procs, bases, strict=True):
            wait_for_health(base, timeout=90, alive=lambda p=proc: p.poll() is None)
        answers = _burst(httpx, bases, key, 14)
        _assert_limited(answers, limit, record.id)
        assert {r.url.port for r in answers} == set(ports)
        # another key is not affected by this one's window, on either server
        other, _ = KeyStore(tmp_path / "keys.sqlite").create("other", "user", rate_limit=1)
        for base, want in zip(bases, (200, 429), strict=True):
            r = httpx.get(
                f"{base}/v1/models", headers={"Authorization": f"Bearer {other}"}, timeout=30
            )
            assert r.status_code == want
    finally:
        _stop(procs)
    _assert_one_chain(tmp_path, 14 + 2)


def test_serve_workers_share_one_limit(tmp_path):
    """`deepwhale serve --workers 2`: uvicorn's worker processes on one port share the limit."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    limit = 4
    key, record = KeyStore(tmp_path / "keys.sqlite").create("shared", "user", rate_limit=limit)
    port = _free_port()
    proc = _serve(tmp_path, port, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, timeout=120, alive=lambda: proc.poll() is None)
        _assert_limited(_burst(httpx, [base], key, 12), limit, record.id)
    finally:
        _stop([proc])
    log = (tmp_path / f"serve-{port}.log").read_text(errors="replace")
    assert log.count("Started server process") == 2, log  # two workers did serve
    _assert_one_chain(tmp_path, 12)


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
