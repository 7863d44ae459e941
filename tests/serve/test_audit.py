"""The audit log: one hash-chained row per request, tamper detection, export, the `audit` verbs,
and no lost committed row when the server process is killed mid-stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.cli import app as cli  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.audit import AuditLog, export, verify  # noqa: E402
from deepwhale.serve.auth import KeyStore  # noqa: E402
from tests.serve.conftest import wait_for_health  # noqa: E402

NAME = "stories260K"
PROMPT = "Once upon a time"
BODY = {"model": NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def model():
    return DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 64)


def _rows(path) -> list[dict]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM audit ORDER BY id")]
    finally:
        db.close()


def test_requests_make_a_valid_chain(model, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, record = store.create("app", "user")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(model, NAME, data_dir=tmp_path, auth=True)) as client:
        assert client.post("/v1/completions", json=BODY, headers=headers).status_code == 200
        stream = client.post("/v1/completions", json={**BODY, "stream": True}, headers=headers)
        assert stream.status_code == 200 and "[DONE]" in stream.text
        assert client.post("/v1/completions", json=BODY).status_code == 401
        assert client.get("/health").status_code == 200
    rows = _rows(tmp_path / "audit.sqlite")
    assert [(r["route"], r["status"], r["key_id"]) for r in rows] == [
        ("/v1/completions", 200, record.id),
        ("/v1/completions", 200, record.id),
        ("/v1/completions", 401, None),
        ("/health", 200, None),
    ]
    for r in rows[:2]:  # the stream's row is written after its last byte, with its counts
        assert r["model"] == NAME and r["completion_tokens"] == 3 and r["prompt_tokens"] > 0
        assert r["latency_ms"] > 0 and r["prompt"] is None
    assert rows[3]["prompt_tokens"] is None
    result = verify(tmp_path / "audit.sqlite")
    assert result.ok and result.rows == 4


def test_prompts_only_when_opted_in(model, tmp_path):
    app = create_app(model, NAME, data_dir=tmp_path, audit_prompts=True)
    with TestClient(app) as client:
        client.post("/v1/completions", json=BODY)
        chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi there"}]}
        client.post("/v1/chat/completions", json=chat)  # 400 (no template); prompt still logged
    rows = _rows(tmp_path / "audit.sqlite")
    assert rows[0]["prompt"] == PROMPT and "Hi there" in rows[1]["prompt"]
    assert verify(tmp_path / "audit.sqlite").ok


def _log(path, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append("/v1/completions", 200, 1.5 + i, key_id="key_x", model=NAME, prompt_tokens=i)
    log.close()


def test_edit_is_detected(tmp_path):
    path = tmp_path / "audit.sqlite"
    _log(path, 5)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE audit SET status = 500 WHERE id = 3")
    result = verify(path)
    assert not result.ok and result.bad_id == 3 and "edited" in result.reason
    r = CliRunner().invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "row 3" in r.output


def test_edit_with_rehash_is_detected_at_the_next_row(tmp_path):
    from deepwhale.serve.audit import row_hash

    path = tmp_path / "audit.sqlite"
    _log(path, 4)
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM audit WHERE id = 2").fetchone())
    row["status"] = 204
    db.execute("UPDATE audit SET status = 204, hash = ? WHERE id = 2", (row_hash(row),))
    db.commit()
    db.close()
    result = verify(path)
    assert not result.ok and result.bad_id == 3


@pytest.mark.parametrize("deleted", [1, 3])
def test_delete_is_detected(tmp_path, deleted):
    path = tmp_path / "audit.sqlite"
    _log(path, 5)
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM audit WHERE id = ?", (deleted,))
    result = verify(path)
    assert not result.ok and result.bad_id == deleted and "deleted" in result.reason


def test_export_and_cli(tmp_path):
    _log(tmp_path / "audit.sqlite", 3)
    out = tmp_path / "out" / "audit.jsonl"
    runner = CliRunner()
    r = runner.invoke(cli, ["audit", "export", "--out", str(out), "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [1, 2, 3]
    assert lines[1]["prev_hash"] == lines[0]["hash"] and lines[2]["prompt_tokens"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["audit.jsonl"]  # no temp file left
    assert export(tmp_path / "audit.sqlite", out) == 3
    r = runner.invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "3 rows" in r.stdout
    empty = tmp_path / "empty"
    r = runner.invoke(cli, ["audit", "verify", "--data-dir", str(empty)])
    assert r.exit_code == 2 and "no audit log" in r.output
    with pytest.raises(FileNotFoundError):
        export(empty / "audit.sqlite", out)


def test_killed_mid_stream_keeps_committed_rows(tmp_path):
    """`deepwhale serve` in a real process, SIGKILLed while a long stream is in flight."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "deepwhale.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(tmp_path), "--no-auth", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, timeout=60, alive=lambda: proc.poll() is None)
        for _ in range(3):
            r = httpx.post(f"{base}/v1/completions", json=BODY, timeout=30)
            assert r.status_code == 200
        long = {"model": NAME, "prompt": PROMPT, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", f"{base}/v1/completions", json=long, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    r = CliRunner().invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "audit.sqlite")
    done = [r for r in rows if r["route"] == "/v1/completions"]
    assert [(r["status"], r["completion_tokens"]) for r in done] == [(200, 3)] * 3
    assert rows[0]["route"] == "/health"


# ---------------------------------------------------------------------- the tail (QA findings)
def _delete(path, where: str) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"DELETE FROM audit {where}")


@pytest.mark.parametrize("where,first_gone", [("WHERE id >= 4", 4), ("", 1)])
def test_tail_deletion_while_running_is_detected(tmp_path, caplog, where, first_gone):
    """Cutting the newest rows (or all of them) under a running writer: verify fails at once
    (the head anchor), and the writer refuses to re-chain onto the shortened tail."""
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    for i in range(5):
        log.append("/v1/completions", 200, 1.0 + i)
    assert json.loads((tmp_path / "audit.sqlite.head").read_text())["id"] == 5
    _delete(path, where)
    result = verify(path)
    assert not result.ok and result.bad_id == 5 and "cut from the end" in result.reason
    with caplog.at_level("ERROR", logger="deepwhale.serve.audit"):
        row = log.append("/health", 200, 1.0)
    assert "row 5" in caplog.text and "missing" in caplog.text
    assert row["id"] == 6  # continues the remembered chain: the cut stays a visible gap
    log.append("/health", 200, 1.0)
    log.close()
    result = verify(path)
    assert not result.ok and result.bad_id == first_gone and "deleted" in result.reason
    r = CliRunner().invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and f"row {first_gone}" in r.output


def test_tail_cut_while_stopped_is_detected(tmp_path, caplog):
    """Rows cut while no server runs: the head file names the missing row; a restarted writer
    anchors on the head too."""
    path = tmp_path / "audit.sqlite"
    _log(path, 5)
    _delete(path, "WHERE id = 5")
    r = CliRunner().invoke(cli, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "row 5" in r.output and "head anchor" in r.output
    with caplog.at_level("ERROR", logger="deepwhale.serve.audit"):
        log = AuditLog(path)
        assert log.append("/health", 200, 1.0)["id"] == 6
    log.close()
    assert "row 5" in caplog.text
    assert not verify(path).ok


def test_replaced_last_row_is_detected(tmp_path):
    """The last row deleted and a forged one re-hashed in its place: the head disagrees."""
    from deepwhale.serve.audit import row_hash

    path = tmp_path / "audit.sqlite"
    _log(path, 3)
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM audit WHERE id = 3").fetchone())
    row["status"] = 204
    db.execute("UPDATE audit SET status = 204, hash = ? WHERE id = 3", (row_hash(row),))
    db.commit()
    db.close()
    result = verify(path)
    assert not result.ok and result.bad_id == 3 and "head anchor" in result.reason


def test_stale_head_is_not_a_false_alarm(tmp_path):
    """A crash between a commit and the head write leaves rows newer than the head: fine, and
    a restarted writer chains onto the real tail (as does a second process writing)."""
    from deepwhale.checkpoint.io import write_json

    path = tmp_path / "audit.sqlite"
    _log(path, 4)
    head = tmp_path / "audit.sqlite.head"
    rows = _rows(path)
    write_json(head, {"id": 2, "hash": rows[1]["hash"]})
    assert verify(path).ok
    other = AuditLog(path)  # another writer on the same file
    log = AuditLog(path)
    assert log.append("/health", 200, 1.0)["id"] == 5
    assert other.append("/health", 200, 1.0)["id"] == 6
    assert log.append("/health", 200, 1.0)["id"] == 7
    log.close()
    other.close()
    assert verify(path) == verify(path) and verify(path).ok and verify(path).rows == 7
    head.write_text("not json")
    assert not verify(path).ok and "head anchor" in verify(path).reason


def test_lone_surrogates_are_stored_escaped(tmp_path):
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    row = log.append("/v1/\ud800", 400, 1.0, model="\ud800", prompt="a\udfffb")
    log.close()
    assert row["model"] == "\\ud800" and row["prompt"] == "a\\udfffb"
    assert _rows(path)[0]["route"] == "/v1/\\ud800" and verify(path).ok


def test_every_request_gets_a_row(model, tmp_path):
    """Lone-surrogate bodies get a clean 400 and a row; a context-length 400 records the
    prompt's token count (the prompt was tokenized)."""
    app = create_app(model, NAME, data_dir=tmp_path, audit_prompts=True)
    json_ct = {"content-type": "application/json"}
    with TestClient(app) as client:
        r = client.post(
            "/v1/completions", content=b'{"model": "\\ud800", "prompt": "x"}', headers=json_ct
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = client.post("/v1/completions", content=b'{"prompt": "a\\ud800"}', headers=json_ct)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        long = {"prompt": PROMPT, "max_tokens": 1000}
        assert client.post("/v1/completions", json=long).status_code == 400
        r = client.post("/v1/completions", json={"prompt": PROMPT * 30, "max_tokens": 1})
        assert r.json()["error"]["code"] == "context_length_exceeded"
    rows = _rows(tmp_path / "audit.sqlite")
    assert [r["status"] for r in rows] == [400] * 4
    n = len(model.tokenizer.encode(PROMPT))
    assert [r["prompt_tokens"] for r in rows] == [
        None,
        None,
        n,
        len(model.tokenizer.encode(PROMPT * 30)),
    ]
    assert verify(tmp_path / "audit.sqlite").ok


def test_cancelled_stream_is_audited_499(model, tmp_path):
    """A stream the client closes mid-way is logged as 499, like a non-streaming one."""
    from tests.serve.conftest import serve_in_thread

    big = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2, 512)
    app = create_app(big, NAME, data_dir=tmp_path)
    body = {
        "prompt": PROMPT,
        "max_tokens": 480,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    for base in serve_in_thread(app):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        deadline = time.monotonic() + 10
        while not [r for r in _rows(tmp_path / "audit.sqlite") if r["route"] == "/v1/completions"]:
            assert time.monotonic() < deadline, "no audit row for the cancelled stream"
            time.sleep(0.05)
        done = httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert done.status_code == 200 and "[DONE]" in done.text
    rows = [r for r in _rows(tmp_path / "audit.sqlite") if r["route"] == "/v1/completions"]
    assert [r["status"] for r in rows] == [499, 200]
    assert rows[0]["completion_tokens"] < 480
