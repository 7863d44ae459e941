"""Audit chain formats (a log written before format 2 still verifies, and continues), and the
model name on the rows of requests refused before a route runs (401, 403, 429, 413)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
httpx = pytest.importorskip("httpx")
TIMEOUT = 30  # s; generous, other work shares these cores

from typer.testing import CliRunner  # noqa: E402

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.cli import app as cli  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.audit import CHAIN_VERSION, AuditLog, iter_rows, verify  # noqa: E402
from deepwhale.serve.auth import KeyStore  # noqa: E402
from deepwhale.serve.bodypeek import PEEK_BYTES, model_from_prefix  # noqa: E402
from deepwhale.serve.middleware import MAX_BODY_BYTES  # noqa: E402
from tests.serve.conftest import serve_in_thread  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
NAME = "stories260K"


def _old_log(folder: Path) -> Path:
    """``folder/audit.sqlite`` rebuilt from the dump of a log written by the format 1 code."""
    path = folder / "audit.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript((FIXTURES / "audit_v1.sql").read_text(encoding="utf-8"))
    shutil.copyfile(FIXTURES / "audit_v1.sqlite.head", folder / "audit.sqlite.head")
    return path


def test_a_log_written_before_format_2_verifies_and_continues(tmp_path):
    path = _old_log(tmp_path)
    assert verify(path).ok and verify(path).rows == 4  # read-only, not migrated
    r = CliRunner().invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "4 rows" in r.stdout, r.output
    assert [row["chain_version"] for row in iter_rows(path)] == [None] * 4
    log = AuditLog(path)  # adds the format 2 columns
    log.append("/admin/keys", 201, 2.0, key_id="key_admin", action="keys.create key_x role=user")
    log.append("/v1/completions", 401, 0.5, model=NAME)
    log.close()
    AuditLog(path).close()  # a second open migrates nothing twice
    result = verify(path)
    assert result.ok and result.rows == 6, result
    rows = list(iter_rows(path))
    assert [r["chain_version"] for r in rows] == [None] * 4 + [CHAIN_VERSION] * 2
    assert rows[4]["prev_hash"] == rows[3]["hash"]  # one chain through both formats
    assert rows[4]["action"] == "keys.create key_x role=user"


@pytest.mark.parametrize(
    "sql,bad_id",
    [
        ("UPDATE audit SET status = 200 WHERE id = 3", 3),  # an old row edited
        ("UPDATE audit SET action = 'keys.list' WHERE id = 5", 5),  # a new row's action
        ("UPDATE audit SET chain_version = NULL, action = NULL WHERE id = 5", 5),  # downgrade
        ("UPDATE audit SET chain_version = 9 WHERE id = 6", 6),
    ],
)
def test_tampering_with_either_format_is_detected(tmp_path, sql, bad_id):
    path = _old_log(tmp_path)
    log = AuditLog(path)
    log.append("/admin/keys", 201, 2.0, key_id="key_admin", action="keys.create key_x")
    log.append("/v1/completions", 200, 3.0, model=NAME)
    log.close()
    with sqlite3.connect(path) as db:
        db.execute(sql)
    result = verify(path)
    assert not result.ok and result.bad_id == bad_id, result


@pytest.mark.parametrize(
    "body,model",
    [
        (b'{"model": "m1", "prompt": "hi"}', "m1"),
        (b' \n{"prompt": "hi", "model":"m2"}', "m2"),
        (b'{"metadata": {"model": "inner"}, "prompt": "x"}', None),  # nested: not the body's
        (b'{"messages": [{"content": "\\"model\\": \\"no\\""}], "model": "m3"}', "m3"),
        (b'{"model": "a", "model": "b"}', "b"),  # as json.loads: the last wins
        (b'{"model": "cut", "prompt": "never clo', "cut"),  # cut after the model
        (b'{"prompt": "x", "model": "cu', None),  # cut inside it
        (b"model=m1&prompt=hi", None),  # not JSON
        (b'["model", "m1"]', None),
        (b'{"model": 7}', None),
        (b'{"model": ""}', None),
        (b'{"model": "' + b"x" * 300 + b'"}', None),  # too long for a model name
        (b'{"model": "caf\xc3\xa9", "p": "\xe2\x82', "caf\u00e9"),  # UTF-8 cut mid-character
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "deep"}', None),
        (b"", None),
        (b"\xff\xfe{", None),
    ],
)
def test_model_from_prefix(body, model):
    assert model_from_prefix(body) == model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base, home, keys)``: a real auth-on server on 127.0.0.1 with its data folder."""
    home = tmp_path_factory.mktemp("refused-home")
    store = KeyStore(home / "keys.sqlite")
    keys = {
        "user": store.create("app", "user")[0],
        "viewer": store.create("dash", "viewer")[0],
        "slow": store.create("slow", "user", rate_limit=1)[0],
    }
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 64)
    app = create_app(model, NAME, data_dir=home, auth=True)
    for base in serve_in_thread(app):
        yield base, home, keys


def _last_row(home: Path, route: str, seen: set[int] = set()) -> dict:  # noqa: B006
    """The newest row of ``route`` not returned before; waits for it (the row is committed
    just after the response's last byte, so it may trail the client by a moment)."""
    deadline = time.monotonic() + 10
    while True:
        rows = [r for r in iter_rows(home / "audit.sqlite") if r["route"] == route]
        if rows and rows[-1]["id"] not in seen:
            seen.add(rows[-1]["id"])
            return rows[-1]
        assert time.monotonic() < deadline, "no new audit row"
        time.sleep(0.02)


def test_refused_rows_carry_the_model(server):
    base, home, keys = server
    body = {"model": NAME, "prompt": "Once", "max_tokens": 1}
    url = f"{base}/v1/completions"

    r = httpx.post(url, json=body, timeout=TIMEOUT)  # no key
    assert r.status_code == 401
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"], row["key_id"]) == (401, NAME, None)

    r = httpx.post(
        url, json={**body, "model": "other-model"}, headers=_h(keys["viewer"]), timeout=TIMEOUT
    )
    assert r.status_code == 403  # the viewer role may not call /v1/*
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (403, "other-model")

    assert httpx.post(url, json=body, headers=_h(keys["slow"]), timeout=TIMEOUT).status_code == 200
    assert _last_row(home, "/v1/completions")["status"] == 200
    r = httpx.post(url, json={**body, "model": "third"}, headers=_h(keys["slow"]), timeout=TIMEOUT)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (429, "third")

    # 413 by Content-Length: the model is in the first 64 KiB
    big = json.dumps({"model": NAME, "prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    r = httpx.post(url, content=big, headers=_h(keys["user"]), timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (413, NAME)

    # 413 of a chunked body (no Content-Length), read until it passed the limit
    def chunks():
        yield b'{"model": "chunked-model", "prompt": "'
        for _ in range(MAX_BODY_BYTES // PEEK_BYTES + 2):
            yield b"y" * PEEK_BYTES
        yield b'"}'

    r = httpx.post(url, content=chunks(), headers=_h(keys["user"]), timeout=TIMEOUT)
    assert r.status_code == 413
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (413, "chunked-model")

    # a body that is not JSON: no model, and still a JSON 401
    r = httpx.post(
        url, content=b"\x00\xff not json", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (401, None)

    # a model the key may not use is refused by the route, which names the model too
    other = KeyStore(home / "keys.sqlite").create("narrow", "user", models=["x"])[0]
    assert httpx.post(url, json=body, headers=_h(other), timeout=TIMEOUT).status_code == 403
    row = _last_row(home, "/v1/completions")
    assert (row["status"], row["model"]) == (403, NAME)
    assert verify(home / "audit.sqlite").ok


def _h(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
