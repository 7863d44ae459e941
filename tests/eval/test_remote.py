"""``deepwhale eval --model http://...``: scoring through a live server, retries and errors."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("httpx")

from deepwhale.eval.remote import RemoteError, RemoteModel, is_url  # noqa: E402

CARD = {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 64}]}


class _Flaky(BaseHTTPRequestHandler):
    """Answers ``fail`` requests with ``status`` (and ``Retry-After: 0``), then succeeds."""

    fail = 0
    status = 503
    seen: list[str] = []

    def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, ok: dict) -> None:
        type(self).seen.append(self.path)
        if type(self).fail > 0:
            type(self).fail -= 1
            self._send(self.status, {"error": {"message": "busy, try later"}}, {"Retry-After": "0"})
        else:
            self._send(200, ok)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(CARD)

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(n))
        choices = []
        for i, p in enumerate(body["prompt"]):
            lps = [None] + [-0.5] * (len(p) - 1)
            tops = [None] + [{"a": -0.5}] * (len(p) - 1)
            choices.append(
                {"index": i, "text": "", "logprobs": {"token_logprobs": lps, "top_logprobs": tops}}
            )
        self._answer({"choices": choices[::-1]})  # out of order: the client sorts by index

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def flaky():
    _Flaky.fail, _Flaky.status, _Flaky.seen = 0, 503, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_is_url():
    assert is_url("http://h:1/v1") and is_url("https://h/v1")
    assert not is_url("models/x") and not is_url(None) and not is_url("")


def test_retries_5xx_and_429_then_succeeds(flaky):
    _Flaky.fail = 2
    m = RemoteModel(flaky, tokenizer=None, backoff=0.01)
    assert m.model == "m" and m.config.max_position_embeddings == 63
    _Flaky.fail, _Flaky.status = 2, 429
    scores = m.score_requests([([1, 2], [3, 4]), ([5], [6])], max_len=64, batch_size=2)
    assert [s.tokens for s in scores] == [2, 1]
    assert math.isclose(scores[0].logprob, -1.0) and scores[0].is_greedy
    assert _Flaky.seen.count("/v1/completions") == 3  # two refusals, one answer


def test_gives_up_naming_the_url_and_the_last_error(flaky):
    _Flaky.fail = 10
    with pytest.raises(
        RemoteError, match=r"/v1/models: failed after 3 tries; last: HTTP 503: busy"
    ):
        RemoteModel(flaky, tokenizer=None, max_retries=2, backoff=0.01)


def test_other_4xx_fail_at_once(flaky):
    _Flaky.fail, _Flaky.status = 5, 401
    with pytest.raises(RemoteError, match="HTTP 401: busy, try later"):
        RemoteModel(flaky, tokenizer=None, backoff=0.01)
    assert len(_Flaky.seen) == 1


def test_no_context_length(flaky):
    CARD["data"][0].pop("max_model_len")
    try:
        with pytest.raises(RemoteError, match="no max_model_len for m; pass --max-length"):
            RemoteModel(flaky, tokenizer=None)
        assert (
            RemoteModel(flaky, tokenizer=None, max_length=32).config.max_position_embeddings == 31
        )
    finally:
        CARD["data"][0]["max_model_len"] = 64


def test_unreachable_server():
    with pytest.raises(RemoteError, match="failed after 2 tries; last: ConnectError"):
        RemoteModel("http://127.0.0.1:9/v1", tokenizer=None, max_retries=1, backoff=0.01)


def test_bad_requests(flaky):
    m = RemoteModel(flaky, tokenizer=None, backoff=0.01)
    with pytest.raises(ValueError, match="empty context"):
        m.score_requests([([], [1])], max_len=64)
    with pytest.raises(ValueError, match="continuation of 64 tokens > max_len 63"):
        m.score_requests([([1], list(range(64)))], max_len=63)
    with pytest.raises(ValueError, match="batch_size"):
        m.score_requests([([1], [2])], max_len=64, batch_size=0)


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("fastapi")
    from deepwhale.api import DeepSeekModel
    from deepwhale.serve import create_app
    from tests.serve.conftest import serve_in_thread

    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(2)
    for base in serve_in_thread(create_app(model, "stories260K")):
        yield model, f"{base}/v1"


def test_remote_scores_equal_local_ones(live):
    """The same task through the server and in-process: equal scores, so equal metrics."""
    from deepwhale.eval import evaluate
    from tests.helpers import shared_data

    model, url = live
    remote = RemoteModel(url, model.tokenizer)
    assert remote.config.max_position_embeddings == model.engine.max_seq_len - 1
    bench = shared_data("bench")
    got = evaluate(remote, ["arc_easy"], bench, limit=8, batch_size=3)
    # the local reference at the same context (one token less than the server's)
    model.config.max_position_embeddings -= 1
    try:
        want = evaluate(model, ["arc_easy"], bench, limit=8, batch_size=1)
    finally:
        model.config.max_position_embeddings += 1
    for key in ("acc", "acc_norm"):
        assert got["results"]["arc_easy"][key] == want["results"]["arc_easy"][key]
    assert got["config"]["device"] == "remote" and got["config"]["model"] == url


def test_remote_bad_key_is_reported(tmp_path):
    pytest.importorskip("fastapi")
    from deepwhale.api import DeepSeekModel
    from deepwhale.serve import create_app
    from tests.serve.conftest import serve_in_thread

    model = DeepSeekModel.from_pretrained(device="cpu")
    for base in serve_in_thread(create_app(model, "m", data_dir=tmp_path, auth=True)):
        with pytest.raises(RemoteError, match="HTTP 401"):
            RemoteModel(f"{base}/v1", model.tokenizer, api_key="wrong", backoff=0.01)


def test_remote_request_scores_match_the_forward_pass(live):
    """Per request, including one cut on the left to the context: logprob within 1e-4 and the
    same greedy flag."""
    from deepwhale.eval.scoring import score_requests

    model, url = live
    remote = RemoteModel(url, model.tokenizer)
    n = remote.config.max_position_embeddings
    ids = model.tokenizer.encode("Once upon a time there was a girl. " * 60)
    reqs = [(ids[:5], ids[5:9]), (ids[:1], ids[1:2]), (ids[: n + 20], ids[n + 20 : n + 25])]
    reqs.append(([ids[0]], ids[1 : n + 1]))  # a whole rolling window: n targets after the prefix
    got = remote.score_requests(reqs, n, batch_size=2)
    want = score_requests(model.module, reqs, n, batch_size=1)
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens and g.is_greedy == w.is_greedy
        assert math.isclose(g.logprob, w.logprob, abs_tol=1e-4 * max(1, w.tokens))


def test_cli_with_a_server_url(live, tmp_path):
    from typer.testing import CliRunner

    from deepwhale.api import DEFAULT_MODEL
    from deepwhale.cli import app

    _, url = live
    args = ["eval", "--model", url, "--tasks", "arc_easy", "--limit", "3", "--quiet"]
    res = CliRunner().invoke(
        app, [*args, "--tokenizer", str(DEFAULT_MODEL), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["device"] == "remote"
    assert results["results"]["arc_easy"]["samples"] == 3
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "needs --tokenizer DIR" in res.output
    res = CliRunner().invoke(app, [*args, "--tokenizer", str(DEFAULT_MODEL), "--quantize", "int8"])
    assert res.exit_code == 2 and "--quantize needs a local model" in res.output


def test_remote_generation_equals_local(live):
    """gsm8k through the server: the same greedy text as in process (up to the leading space
    of the first token, which the server keeps and lm-eval's decoding drops)."""
    from deepwhale.eval import evaluate

    model, url = live
    remote = RemoteModel(url, model.tokenizer)
    kw = dict(limit=2, num_fewshot=0, max_gen_toks=16, log_samples=True, batch_size=2)
    got = evaluate(remote, ["gsm8k"], **kw)["samples"]["gsm8k"]
    model.config.max_position_embeddings -= 1
    try:
        want = evaluate(model, ["gsm8k"], **kw)["samples"]["gsm8k"]
    finally:
        model.config.max_position_embeddings += 1
    assert [g["response"].lstrip() for g in got] == [w["response"].lstrip() for w in want]
    assert any(g["response"].strip() for g in got)
    with pytest.raises(ValueError, match="greedy"):
        remote.generate_batch([[1, 2]], temperature=0.5)
