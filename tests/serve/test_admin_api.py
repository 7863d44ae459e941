"""The admin API against a real server on 127.0.0.1: keys (create, list, revoke), usage per key
and day from the audit log, audit export and verify, every admin call audited; admin role only."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.audit import iter_rows  # noqa: E402
from deepwhale.serve.auth import KeyStore  # noqa: E402
from tests.serve.conftest import serve_in_thread  # noqa: E402

NAME = "stories260K"


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 64)


@pytest.fixture()
def server(model, tmp_path):
    """``(base, home, root)``: an auth-on server over a fresh data folder and its admin key."""
    root, _ = KeyStore(tmp_path / "keys.sqlite").create("root", "admin")
    for base in serve_in_thread(create_app(model, NAME, data_dir=tmp_path, auth=True)):
        yield base, tmp_path, root


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _settled(home, n: int, timeout: float = 10) -> list[dict]:
    """The audit rows once there are at least ``n`` (a row is committed just after the
    response's last byte)."""
    deadline = time.monotonic() + timeout
    while len(rows := list(iter_rows(home / "audit.sqlite"))) < n:
        assert time.monotonic() < deadline, f"{len(rows)} audit rows, waited for {n}"
        time.sleep(0.02)
    return rows


def test_key_lifecycle_and_roles(server):
    base, home, root = server
    with httpx.Client(base_url=base, headers=_h(root), timeout=30) as admin:
        r = admin.post("/admin/keys", json={"name": "app", "role": "user", "rate_limit": 100})
        assert r.status_code == 201, r.text
        made = r.json()
        plain, key_id = made["key"], made["id"]
        assert plain.startswith("dw-") and made["role"] == "user" and made["active"]
        # the new key works at once, through the openai client
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=plain, max_retries=0)
        done = client.completions.create(model=NAME, prompt="Once", max_tokens=2, temperature=0)
        assert done.usage.completion_tokens == 2
        # listed without its secret; shown once only
        listed = admin.get("/admin/keys").json()["data"]
        assert {k["id"] for k in listed} >= {key_id} and plain not in json.dumps(listed)
        assert all("key" not in k for k in listed)
        # a non-admin key gets 403 on every admin route, no key 401
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("DELETE", f"/admin/keys/{key_id}"),
            ("GET", "/admin/usage"),
            ("GET", "/admin/audit/export"),
            ("GET", "/admin/audit/verify"),
        ]:
            r = httpx.request(method, base + path, headers=_h(plain), json={"name": "x"})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "insufficient_permissions"
            assert httpx.request(method, base + path).status_code == 401
        # bad input: a JSON 400, never a 500
        r = admin.post("/admin/keys", json={"name": "x", "role": "root"})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        r = admin.post("/admin/keys", json={"name": "x", "models": ["a,b"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_key_request"
        assert admin.post("/admin/keys", json={"name": "x", "rate_limit": 0}).status_code == 400
        r = admin.delete("/admin/keys/key_missing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "key_not_found"
        # revoked: the key stops working
        r = admin.delete(f"/admin/keys/{key_id}")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model=NAME, prompt="Once", max_tokens=2)
        listed = {k["id"]: k for k in admin.get("/admin/keys").json()["data"]}
        assert listed[key_id]["active"] is False and listed[key_id]["revoked_at"] is not None
    # every admin call is audited with its action; the plain key is in no row
    rows = _settled(home, 1)
    actions = [r["action"] for r in rows if r["route"].startswith("/admin/")]
    assert f"keys.create {key_id} role=user models=* rate_limit=100" in actions
    assert f"keys.revoke {key_id}" in actions and "keys.list" in actions
    assert "GET /admin/audit/export" in actions  # refused calls name what was tried
    refused = [r for r in rows if r["route"].startswith("/admin/") and r["status"] == 403]
    assert len(refused) == 6 and {r["key_id"] for r in refused} == {key_id}
    assert plain not in json.dumps(rows)


def test_usage_export_and_verify(server):
    base, home, root = server
    store = KeyStore(home / "keys.sqlite")
    a, ka = store.create("a", "user")
    b, kb = store.create("b", "user", rate_limit=2)
    sent = {ka.id: [(3, "Once upon"), (5, "Hi")], kb.id: [(4, "Once")]}
    usage_by_key = {}
    for key, rec in ((a, ka), (b, kb)):
        prompt_tokens = completion_tokens = 0
        for max_tokens, prompt in sent[rec.id]:
            body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            r = httpx.post(f"{base}/v1/completions", json=body, headers=_h(key), timeout=30)
            assert r.status_code == 200
            prompt_tokens += r.json()["usage"]["prompt_tokens"]
            completion_tokens += r.json()["usage"]["completion_tokens"]
        usage_by_key[rec.id] = (len(sent[rec.id]), prompt_tokens, completion_tokens)
    assert httpx.get(f"{base}/v1/models", headers=_h(b)).status_code == 200  # b's 2nd
    assert httpx.get(f"{base}/v1/models", headers=_h(b)).status_code == 429  # and over
    n_before = 3 + 2
    _settled(home, n_before)
    today = datetime.now(timezone.utc).date().isoformat()
    with httpx.Client(base_url=base, headers=_h(root), timeout=30) as admin:
        data = admin.get("/admin/usage", params={"since": today, "until": today}).json()["data"]
        got = {(d["key_id"], d["date"]): d for d in data}
        ua = got[(ka.id, today)]
        assert (ua["requests"], ua["ok"], ua["prompt_tokens"], ua["completion_tokens"]) == (
            2,
            2,
            *usage_by_key[ka.id][1:],
        )
        ub = got[(kb.id, today)]
        assert (ub["requests"], ub["ok"], ub["completion_tokens"]) == (3, 2, 4)
        assert ub["prompt_tokens"] == usage_by_key[kb.id][1]
        only = admin.get("/admin/usage", params={"key_id": ka.id}).json()["data"]
        assert [d["key_id"] for d in only] == [ka.id]
        assert admin.get("/admin/usage", params={"until": "2000-01-01"}).json()["data"] == []
        r = admin.get("/admin/usage", params={"since": "yesterday"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"

        r = admin.get("/admin/audit/verify")
        assert r.status_code == 200 and r.json()["ok"] and r.json()["rows"] >= n_before
        r = admin.get("/admin/audit/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        exported = [json.loads(line) for line in r.text.splitlines()]
        assert [e["id"] for e in exported] == list(range(1, len(exported) + 1))
        assert exported == list(iter_rows(home / "audit.sqlite"))[: len(exported)]
        since = exported[-1]["id"]
        tail = admin.get("/admin/audit/export", params={"since": since}).text.splitlines()
        assert all(json.loads(line)["id"] > since for line in tail)
        # tampering with one row: verify over HTTP names it
        bad = exported[2]["id"]
        with sqlite3.connect(home / "audit.sqlite") as db:
            db.execute("UPDATE audit SET completion_tokens = 999 WHERE id = ?", (bad,))
        r = admin.get("/admin/audit/verify").json()
        assert not r["ok"] and r["bad_id"] == bad and "edited" in r["reason"]
    rows = _settled(home, since + 3)
    assert {"audit.verify", f"audit.export since={since}"} <= {r["action"] for r in rows}


def test_admin_api_is_off_without_keys(model, tmp_path):
    for base in serve_in_thread(create_app(model, NAME, data_dir=tmp_path, auth=False)):
        r = httpx.post(f"{base}/admin/keys", json={"name": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "admin_api_off"
        assert httpx.get(f"{base}/admin/audit/verify").status_code == 404
    assert KeyStore(tmp_path / "keys.sqlite").list() == []
