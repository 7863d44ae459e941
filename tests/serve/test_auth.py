"""API keys: the SQLite key store, the server's 401 / 403 / 429 answers, and the `keys` verbs.

The app runs in-process under FastAPI's TestClient (lifespan on, so the real engine decodes) with
its key and audit databases in ``tmp_path``.
"""

from __future__ import annotations

import sqlite3

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.cli import app as cli  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.auth import KeyStore, bearer_token  # noqa: E402
from deepwhale.serve.ratelimit import RateLimiter  # noqa: E402

NAME = "stories260K"
BODY = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 64)


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """``(client, store)``: an auth-on app over a fresh data folder."""
    home = tmp_path_factory.mktemp("auth-home")
    store = KeyStore(home / "keys.sqlite")
    with TestClient(create_app(model, NAME, data_dir=home, auth=True)) as client:
        yield client, store


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_missing_bad_and_revoked_keys_get_401(served):
    client, store = served
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/v1/completions", json=BODY, headers=_h("dw-nope")).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic abc"}).status_code == 401
    key, record = store.create("tmp", "user")
    assert client.post("/v1/completions", json=BODY, headers=_h(key)).status_code == 200
    store.revoke(record.id)
    r = client.post("/v1/completions", json=BODY, headers=_h(key))
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/health").status_code == 200  # open


def test_roles_get_403(served):
    client, store = served
    viewer, _ = store.create("dash", "viewer")
    user, _ = store.create("app", "user")
    r = client.post("/v1/completions", json=BODY, headers=_h(viewer))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_permissions"
    assert client.post("/generate", json={"prompt": "Hi"}, headers=_h(viewer)).status_code == 403
    assert client.get("/metrics", headers=_h(viewer)).status_code == 200
    assert client.get("/metrics", headers=_h(user)).status_code == 403
    assert client.get("/v1/models", headers=_h(user)).status_code == 200
    tok = {"prompt": "Hi"}
    assert client.post("/tokenize", json=tok, headers=_h(viewer)).status_code == 403
    assert client.post("/tokenize", json=tok, headers=_h(user)).status_code == 200
    assert client.get("/tokenizer_info").status_code == 401


def test_disallowed_model_gets_403(served):
    client, store = served
    other, _ = store.create("other", "user", models=["some-other-model"])
    both, _ = store.create("both", "user", models=["some-other-model", NAME])
    r = client.post("/v1/completions", json=BODY, headers=_h(other))
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=_h(other))
    assert r.status_code == 403
    assert client.post("/v1/completions", json=BODY, headers=_h(both)).status_code == 200
    # /v1/models lists only what the key may use
    assert client.get("/v1/models", headers=_h(other)).json()["data"] == []
    assert [m["id"] for m in client.get("/v1/models", headers=_h(both)).json()["data"]] == [NAME]
    # ... and retrieving a model the key may not use is a 404, as for an unknown one
    r = client.get(f"/v1/models/{NAME}", headers=_h(other))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get(f"/v1/models/{NAME}", headers=_h(both)).json()["id"] == NAME


def test_rate_limit_gets_429_with_retry_after(served):
    client, store = served
    key, _ = store.create("slow", "user", rate_limit=2)
    for _ in range(2):
        assert client.post("/v1/completions", json=BODY, headers=_h(key)).status_code == 200
    r = client.post("/v1/completions", json=BODY, headers=_h(key))
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_admin_works_everywhere(served):
    client, store = served
    admin, _ = store.create("root", "admin")
    assert client.post("/v1/completions", json=BODY, headers=_h(admin)).status_code == 200
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    # stories260K has no chat template: a 400, but past auth
    assert client.post("/v1/chat/completions", json=chat, headers=_h(admin)).status_code == 400
    r = client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}, headers=_h(admin))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert client.get("/metrics", headers=_h(admin)).status_code == 200
    assert client.get("/v1/models", headers=_h(admin)).status_code == 200


def test_no_auth_needs_no_key(model, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="deepwhale.serve"):
        app = create_app(model, NAME, data_dir=tmp_path, auth=False)
    assert "OFF" in caplog.text
    with TestClient(app) as client:
        assert client.post("/v1/completions", json=BODY).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_keys_are_stored_hashed(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, record = store.create("alice", "admin", models=["a", "b"], rate_limit=5)
    assert key.startswith("dw-") and len(key) > 40
    assert store.verify(key) == record
    assert store.verify(key + "x") is None
    with sqlite3.connect(tmp_path / "keys.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert key.encode() not in raw and key[3:].encode() not in raw
    assert record.id.encode() in raw  # the bytes we searched are the real ones
    assert [k.id for k in store.list()] == [record.id]
    assert store.revoke(record.id).revoked_at is not None and store.verify(key) is None
    with pytest.raises(KeyError):
        store.revoke("key_missing")
    with pytest.raises(ValueError, match="role"):
        store.create("x", "root")
    with pytest.raises(ValueError, match="rate limit"):
        store.create("x", "user", rate_limit=0)


def test_rate_limiter_window_and_bearer_parsing(tmp_path):
    now = [100.0]
    limiter = RateLimiter(tmp_path / "limits.sqlite", clock=lambda: now[0])
    assert limiter.check("k", None) is None
    assert limiter.check("k", 2) is None and limiter.check("k", 2) is None
    assert limiter.check("k", 2) == 60
    now[0] += 59.5
    assert limiter.check("k", 2) == 1
    now[0] += 1
    assert limiter.check("k", 2) is None
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None
    assert bearer_token("Bearer ") is None


def test_keys_cli(tmp_path):
    runner = CliRunner()
    home = ["--data-dir", str(tmp_path)]
    r = runner.invoke(
        cli,
        ["keys", "create", "--name", "bob", "--role", "user", "--models", "m1,m2"]
        + ["--rate-limit", "60", *home],
    )
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("dw-")
    (record,) = KeyStore(tmp_path / "keys.sqlite").list()
    assert record.models == ("m1", "m2") and record.rate_limit == 60
    r = runner.invoke(cli, ["keys", "list", *home])
    assert r.exit_code == 0 and record.id in r.stdout and "bob" in r.stdout
    assert key not in r.stdout
    r = runner.invoke(cli, ["keys", "revoke", record.id, *home])
    assert r.exit_code == 0 and "revoked" in r.stdout
    assert runner.invoke(cli, ["keys", "revoke", "key_nope", *home]).exit_code == 2
    r = runner.invoke(cli, ["keys", "create", "--name", "x", "--role", "root", *home])
    assert r.exit_code == 2 and "role" in r.output


def test_serve_refuses_to_start_without_keys(tmp_path):
    r = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no active API key" in r.output
