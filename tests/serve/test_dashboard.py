"""``GET /dashboard``: the live stats behind it, and the page itself in a real headless Chromium.

The browser check drives Debian's ``chromium`` with Playwright (``executable_path``; Playwright's
own browser download is not used) against a real uvicorn server on 127.0.0.1 with API keys on.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.auth import KeyStore  # noqa: E402
from deepwhale.serve.stats import LiveStats, percentile  # noqa: E402
from tests.serve.conftest import wait_for_health  # noqa: E402

NAME = "stories260K"


class _Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 95) == 95


def test_live_stats_buckets_and_window():
    clock = _Clock()
    stats = LiveStats(lambda: (2, 1), window_s=5, clock=clock)
    stats.token(3)
    stats.request(0.5, 0.1, ok=True)
    clock.t += 1
    stats.token(2)
    stats.request(1.5, None, ok=False)
    snap = stats.snapshot()
    assert [p["tokens"] for p in snap["series"]] == [0, 0, 0, 3, 2]
    assert snap["series"][-2]["latency_p50_ms"] == 500 and snap["series"][-2]["ttft_p50_ms"] == 100
    assert snap["series"][-1]["errors"] == 1 and snap["series"][-1]["ttft_p50_ms"] is None
    assert snap["totals"] == {"requests": 2, "errors": 1, "tokens": 5}
    assert (snap["running"], snap["waiting"]) == (2, 1)
    assert snap["recent"]["tokens_per_s"] == 5 / 1  # one second of uptime so far
    assert snap["recent"]["latency_p95_ms"] == 1500
    clock.t += 10  # everything falls out of the window (and out of memory)
    stats.token()
    snap = stats.snapshot()
    assert [p["tokens"] for p in snap["series"]] == [0, 0, 0, 0, 1]
    assert len(stats._buckets) == 1
    assert snap["totals"]["tokens"] == 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base_url, keys)``: auth-on uvicorn server on a free port; keys by role."""
    home = tmp_path_factory.mktemp("dash-home")
    store = KeyStore(home / "keys.sqlite")
    keys = {role: store.create(role, role)[0] for role in ("viewer", "user", "admin")}
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(4, 128)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    app = create_app(model, NAME, data_dir=home, auth=True)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_for_health(base)
    yield base, keys
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _generate(base: str, key: str, n: int) -> None:
    def one(i: int) -> None:
        body = {"model": NAME, "prompt": f"Once upon a time {i}", "max_tokens": 24, "stream": True}
        with httpx.stream(
            "POST", f"{base}/v1/completions", json=body, headers=_h(key), timeout=60
        ) as r:
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(n)))


def test_stats_endpoint_roles(server):
    base, keys = server
    assert httpx.get(f"{base}/dashboard").status_code == 200  # the page shell is open
    assert httpx.get(f"{base}/dashboard/stats").status_code == 401
    r = httpx.get(f"{base}/dashboard/stats", headers=_h(keys["user"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    for role in ("viewer", "admin"):
        r = httpx.get(f"{base}/dashboard/stats", headers=_h(keys[role]))
        assert r.status_code == 200 and r.json()["model"] == NAME
        assert len(r.json()["series"]) == r.json()["window_s"]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    return path


def test_dashboard_in_headless_chromium(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, keys = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: (
                    m.type == "error"
                    and "401" not in m.text
                    and "403" not in m.text
                    and problems.append(f"console: {m.text}")
                ),
            )
            page.goto(f"{base}/dashboard")
            # Without a key the page asks for one.
            page.wait_for_selector("body[data-state=unauthorised]", timeout=10_000)
            assert page.is_visible("#auth")
            # A user key is refused with the server's reason.
            page.fill("#key", keys["user"])
            page.click("#auth button")
            page.wait_for_function(
                "document.getElementById('auth-msg').textContent.includes('role')", timeout=10_000
            )
            # A viewer key shows live stats.
            page.fill("#key", keys["viewer"])
            page.click("#auth button")
            page.wait_for_selector("body[data-state=live]", timeout=10_000)
            assert not page.is_visible("#auth")
            assert page.text_content("#model") == NAME

            _generate(base, keys["user"], 8)
            # Within a few polls the tiles and both charts show the traffic.
            page.wait_for_function(
                "parseFloat(document.getElementById('tok-s').textContent) > 0", timeout=10_000
            )
            page.wait_for_function(
                "document.getElementById('total').textContent.split(' / ')[0] >= 8",
                timeout=10_000,
            )
            assert page.locator("#chart-throughput polyline.series").count() == 1
            latency_lines = page.locator("#chart-latency polyline.series")
            assert latency_lines.count() == 3  # p50, p95, TTFT
            assert int(latency_lines.first.get_attribute("data-points")) >= 1
            assert page.text_content("#p50").endswith("ms") or page.text_content("#p50").endswith(
                "s"
            )
            # It keeps polling: the "updated" clock moves.
            before = page.text_content("#status")
            time.sleep(1.6)
            assert page.text_content("#status") != before
            assert problems == []
        finally:
            browser.close()


def test_merge_joins_consecutive_chunks_of_one_sample():
    from deepwhale.inference.generate import GenerationChunk
    from deepwhale.serve.sse import merge_chunks as _merge

    batch = [
        (0, GenerationChunk("a", 1)),
        (0, GenerationChunk("b", 2)),
        (1, GenerationChunk("x", 3)),
        (0, GenerationChunk("c", 4, "length")),
        (0, GenerationChunk("", None, "length")),
    ]
    merged = _merge(batch)
    assert [(i, c.text, c.token_id, c.finish_reason) for i, c in merged] == [
        (0, "ab", 2, None),
        (1, "x", 3, None),
        (0, "c", 4, "length"),
        (0, "", None, "length"),
    ]
