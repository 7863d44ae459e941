"""End-to-end tests of ``deepwhale serve``: a real uvicorn server on 127.0.0.1 and the real
``openai`` client (OpenAI API reference shapes), plus raw httpx for malformed input.

Two module-scoped servers: the bundled stories260K model (no chat template) and a random
DeepSeek-V3-shaped debug model with the real R1 tokenizer (chat template).
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from tests.serve.conftest import r1_debug_folder, serve_in_thread  # noqa: E402

GREEDY = ", there was a little girl named Lily."
BATCH = 8


def _serve(model: DeepSeekModel, name: str):
    """``create_app(model, name)`` under uvicorn on a free 127.0.0.1 port (yields the URL)."""
    yield from serve_in_thread(create_app(model, name))


@pytest.fixture(scope="module")
def stories():
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(BATCH)
    for base in _serve(model, "stories260K"):
        yield model, base


@pytest.fixture(scope="module")
def client(stories):
    return openai.OpenAI(base_url=f"{stories[1]}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A random debug-v3 model with the real DeepSeek-R1 tokenizer (and its chat template)."""
    model = DeepSeekModel.from_pretrained(r1_debug_folder(tmp_path_factory), device="cpu")
    for base in _serve(model.set_batch_size(4, 256), "r1-debug"):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)


# ---------------------------------------------------------------------- completions
def test_completion_greedy_and_stream(client):
    kw = dict(model="stories260K", prompt="Once upon a time", max_tokens=30, temperature=0)
    out = client.completions.create(**kw)
    assert out.object == "text_completion"
    assert out.choices[0].text.startswith(GREEDY)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 30
    assert out.usage.total_tokens == out.usage.prompt_tokens + 30
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_stop_string(client):
    out = client.completions.create(
        model="stories260K", prompt="Once upon a time", max_tokens=40, temperature=0, stop="Lily"
    )
    assert out.choices[0].text == ", there was a little girl named "
    assert out.choices[0].finish_reason == "stop"


def test_models_and_health(stories, client):
    before = int(time.time())
    assert [m.id for m in client.models.list().data] == ["stories260K"]
    (card,) = httpx.get(f"{stories[1]}/v1/models").json()["data"]
    # created: the server's start time (unix seconds), before this test ran
    assert isinstance(card["created"], int) and before - 3600 < card["created"] <= before
    assert client.models.retrieve("stories260K").model_dump(exclude_unset=True) == card
    assert httpx.get(f"{stories[1]}/v1/models/stories260K").json() == card
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found" and "gpt-4" in e.value.body["message"]
    r = httpx.get(f"{stories[1]}/v1/models/org/some-model")  # ids may hold slashes
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    health = httpx.get(f"{stories[1]}/health").json()
    assert health["status"] == "ok" and health["model"] == "stories260K"


def test_n_seed_logprobs(client):
    kw = dict(
        model="stories260K",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=0.9,
        n=3,
        seed=7,
        logprobs=2,
    )
    out = client.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) > 0
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert [c.text for c in client.completions.create(**kw).choices] == [
        c.text for c in out.choices
    ]
    assert 0 < out.usage.completion_tokens <= 3 * 12


def test_concurrent_streams_match_alone(client):
    """32 concurrent streaming clients on 8 slots: all complete, each equal to its run alone."""
    prompts = [f"Once upon a time{' there' * (i % 8)}{' Tom' * (i // 8)}" for i in range(32)]
    kw = dict(model="stories260K", max_tokens=24, temperature=0)
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]

    def streamed(p: str) -> str:
        return "".join(
            c.choices[0].text for c in client.completions.create(prompt=p, stream=True, **kw)
        )

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


def test_disconnect_frees_slot(stories, client):
    model, _ = stories
    before = model.engine.stats["generated_tokens"]
    stream = client.completions.create(
        model="stories260K",
        prompt="Once upon a time",
        max_tokens=500,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _chunk in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while len(model.engine.free_slots) < BATCH or model.engine.running:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.02)
    generated = model.engine.stats["generated_tokens"] - before
    assert generated < 500, generated  # cancelled, not run to max_tokens


# ---------------------------------------------------------------------- embeddings
TEXTS = ["Once upon a time", "Lily went to the park with her mom.", "a"]


def _direct(model: DeepSeekModel, text: str, pooling: str = "mean") -> torch.Tensor:
    """The embedding of ``text`` straight from the model module: the decoder's output (after
    the final norm) pooled over the prompt's tokens, L2-normalised."""
    ids = torch.tensor([model.tokenizer.encode(text)])
    with torch.inference_mode():
        h = model.module.model(ids, torch.arange(ids.shape[1])[None])[0].float()  # (T, H)
    v = h.mean(0) if pooling == "mean" else h[-1]
    return v / v.norm()


def _b64(s: str) -> list[float]:
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(s), dtype="<f4").tolist()


def test_embeddings_float_base64_and_mean_pooling(stories, client):
    model, _ = stories
    kw = dict(model="stories260K", input=TEXTS)
    out = client.embeddings.create(**kw, encoding_format="float")
    assert out.object == "list" and out.model == "stories260K"
    assert [d.index for d in out.data] == [0, 1, 2] and all(
        d.object == "embedding" for d in out.data
    )
    assert out.usage.prompt_tokens == sum(len(model.tokenizer.encode(t)) for t in TEXTS)
    assert out.usage.total_tokens == out.usage.prompt_tokens
    floats = [d.embedding for d in out.data]
    raw = client.embeddings.create(**kw, encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in raw.data)
    decoded = client.embeddings.create(**kw)  # the client asks for base64 and decodes it
    for f, r, d, text in zip(floats, raw.data, decoded.data, TEXTS, strict=True):
        assert len(f) == model.config.hidden_size
        assert _b64(r.embedding) == pytest.approx(f, abs=1e-6)
        assert d.embedding == pytest.approx(f, abs=1e-6)
        assert sum(x * x for x in f) == pytest.approx(1.0, abs=1e-5)  # L2-normalised
        assert f == pytest.approx(_direct(model, text).tolist(), abs=1e-5)


def test_embeddings_batch_equals_alone_and_token_ids(stories, client):
    model, _ = stories
    kw = dict(model="stories260K", encoding_format="float")
    batch = [d.embedding for d in client.embeddings.create(input=TEXTS, **kw).data]
    for text, vec in zip(TEXTS, batch, strict=True):
        alone = client.embeddings.create(input=text, **kw).data[0].embedding
        assert vec == pytest.approx(alone, abs=1e-5)
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    by_ids = client.embeddings.create(input=ids, **kw)
    for d, vec in zip(by_ids.data, batch, strict=True):
        assert d.embedding == pytest.approx(vec, abs=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    one = client.embeddings.create(input=ids[0], **kw).data
    assert len(one) == 1 and one[0].embedding == pytest.approx(batch[0], abs=1e-5)


def test_embeddings_last_pooling_and_server_default(stories, client):
    model, _ = stories
    out = client.embeddings.create(
        model="stories260K", input=TEXTS, encoding_format="float", extra_body={"pooling": "last"}
    )
    for d, text in zip(out.data, TEXTS, strict=True):
        assert d.embedding == pytest.approx(_direct(model, text, "last").tolist(), abs=1e-5)
    from fastapi.testclient import TestClient

    with TestClient(create_app(model, "stories260K", embedding_pooling="last")) as tc:
        r = tc.post("/v1/embeddings", json={"input": TEXTS[0]})
        assert r.status_code == 200
        assert r.json()["data"][0]["embedding"] == pytest.approx(out.data[0].embedding, abs=1e-6)
        r = tc.post("/v1/embeddings", json={"input": TEXTS[0], "pooling": "mean"})
        assert r.json()["data"][0]["embedding"] == pytest.approx(
            _direct(model, TEXTS[0]).tolist(), abs=1e-5
        )
    with pytest.raises(ValueError, match="embedding_pooling"):
        create_app(model, "stories260K", embedding_pooling="max")


def test_embeddings_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="stories260K", input=["Once", LONG])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    assert "input 1 is" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="stories260K", input=[[1, 2], [3, 10**9]])
    assert e.value.body["param"] == "input" and "input 1: token ids" in e.value.body["message"]


# ---------------------------------------------------------------------- /generate
def test_generate_endpoint(stories):
    body = {"prompt": "Once upon a time", "max_length": 30, "temperature": 0}
    out = httpx.post(f"{stories[1]}/generate", json=body, timeout=60).json()
    assert set(out) == {"output", "usage"}
    assert out["output"].startswith(GREEDY)
    assert out["usage"]["total_tokens"] == 30
    body = {"prompt": "Once upon a time", "max_new_tokens": 5, "temperature": 0}
    out = httpx.post(f"{stories[1]}/generate", json=body, timeout=60).json()
    assert out["usage"]["completion_tokens"] == 5


# ---------------------------------------------------------------------- chat
def test_chat_without_template_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="stories260K", messages=[{"role": "user", "content": "hi"}]
        )
    assert "chat template" in e.value.body["message"]


def test_chat_stream_with_usage(chat_server):
    kw = dict(
        model="r1-debug",
        messages=[{"role": "user", "content": "What is 1+1?"}],
        max_tokens=16,
        temperature=0,
    )
    out = chat_server.chat.completions.create(**kw)
    content = out.choices[0].message.content
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        chat_server.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == content
    assert chunks[-2].choices[0].finish_reason == out.choices[0].finish_reason


def test_chat_logprobs(chat_server):
    out = chat_server.chat.completions.create(
        model="r1-debug",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the sampled token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_chat_developer_role_is_system(chat_server):
    """A developer message is given the system role before the chat template (as OpenAI does):
    the same prompt, so the same greedy answer, as the same text sent as a system message."""

    def ask(role: str):
        return chat_server.chat.completions.create(
            model="r1-debug",
            messages=[
                {"role": role, "content": "You are a terse assistant."},
                {"role": "user", "content": "What is 1+1?"},
            ],
            max_tokens=8,
            temperature=0,
        )

    developer, system = ask("developer"), ask("system")
    assert developer.choices[0].message.content == system.choices[0].message.content
    assert developer.usage == system.usage
    # the system text is in the prompt: more prompt tokens than the user message alone
    alone = chat_server.chat.completions.create(
        model="r1-debug",
        messages=[{"role": "user", "content": "What is 1+1?"}],
        max_tokens=1,
        temperature=0,
    )
    assert developer.usage.prompt_tokens > alone.usage.prompt_tokens


# ---------------------------------------------------------------------- bad input
LONG = "Once upon a time " * 300
BAD = [
    ("/v1/completions", b'{"prompt": ', 400),
    ("/v1/completions", b"[1, 2", 400),
    ("/v1/completions", {}, 400),
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 100}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/generate", {"prompt": "Once upon a time", "max_length": 2}, 400),
    ("/generate", {"prompt": "x", "top_p": 2}, 400),
    ("/generate", {"prompt": LONG}, 400),
    ("/v1/nothing", {}, 404),
    ("/v1/completions/", {"prompt": "x"}, 404),  # no trailing-slash redirect
    ("/generate", {"prompt": "x", "max_length": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "x", "n": "2"}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/embeddings", {}, 400),
    ("/v1/embeddings", {"input": ""}, 400),
    ("/v1/embeddings", {"input": []}, 400),
    ("/v1/embeddings", {"input": [[]]}, 400),
    ("/v1/embeddings", {"input": ["x", ""]}, 400),
    ("/v1/embeddings", {"input": 5}, 400),
    ("/v1/embeddings", {"input": [1, "x"]}, 400),
    ("/v1/embeddings", {"input": [10**9]}, 400),
    ("/v1/embeddings", {"input": [-1]}, 400),
    ("/v1/embeddings", {"input": LONG}, 400),
    ("/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400),
    ("/v1/embeddings", {"input": "x", "pooling": "max"}, 400),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400),
    ("/v1/embeddings", {"input": ["x"] * 2049}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_4xx_openai_shape(stories, path, body, status):
    url = f"{stories[1]}{path}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]


def test_wrong_method_and_sampling_message(stories):
    r = httpx.get(f"{stories[1]}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.post(f"{stories[1]}/v1/completions", json={"prompt": "x", "temperature": -1})
    assert r.json()["error"]["message"] == "temperature must be >= 0, got -1.0"


def test_internal_errors_are_json_500s(monkeypatch):
    """An unexpected exception answers a 500 in OpenAI's shape (via middleware, so the
    connection is not dropped) and the next request is served normally."""
    from fastapi.testclient import TestClient

    from deepwhale.api import DeepSeekModel
    from deepwhale.serve import create_app

    model = DeepSeekModel.from_pretrained()
    model.set_batch_size(2, max_seq_len=64)
    app = create_app(model, "stories260K")
    with TestClient(app, raise_server_exceptions=False) as client:
        real = model.encode_prompt
        monkeypatch.setattr(
            model, "encode_prompt", lambda p: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        r = client.post("/v1/completions", json={"model": "stories260K", "prompt": "Once"})
        assert r.status_code == 500
        assert (
            r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
        )
        monkeypatch.setattr(model, "encode_prompt", real)
        r = client.post(
            "/v1/completions",
            json={"model": "stories260K", "prompt": "Once", "max_tokens": 3, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_prometheus_metrics():
    """/metrics exposes latency, TTFT and inter-token histograms, token and request counters,
    and the engine's queue and batch gauges, updated by real requests."""
    from fastapi.testclient import TestClient

    from deepwhale.api import DeepSeekModel
    from deepwhale.serve import create_app

    model = DeepSeekModel.from_pretrained()
    model.set_batch_size(2, max_seq_len=64)
    with TestClient(create_app(model, "stories260K")) as client:
        body = {
            "model": "stories260K",
            "prompt": "Once upon a time",
            "max_tokens": 5,
            "temperature": 0,
        }
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.post("/v1/completions", json={**body, "max_tokens": -1}).status_code == 400
        assert client.get("/v1/models/stories260K").status_code == 200
        assert client.get("/v1/models/nope").status_code == 404
        text = client.get("/metrics").text
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert lines['deepwhale_requests_total{route="/v1/completions",status="200"}'] == "1.0"
    assert lines['deepwhale_requests_total{route="/v1/completions",status="400"}'] == "1.0"
    assert lines["deepwhale_time_to_first_token_seconds_count"] == "1.0"
    assert lines["deepwhale_inter_token_latency_seconds_count"] == "4.0"
    assert lines["deepwhale_generation_tokens_total"] == "5.0"
    assert float(lines["deepwhale_prompt_tokens_total"]) == len(
        model.tokenizer.encode("Once upon a time")
    )
    assert lines["deepwhale_queue_depth"] == "0.0" and lines["deepwhale_running_sequences"] == "0.0"
    assert 'deepwhale_request_latency_seconds_count{route="/v1/completions"}' in lines
    # a path with a parameter counts as its route's template, not as "other"
    route = "/v1/models/{model_id:path}"
    assert lines[f'deepwhale_requests_total{{route="{route}",status="200"}}'] == "1.0"
    assert lines[f'deepwhale_requests_total{{route="{route}",status="404"}}'] == "1.0"


def test_non_streaming_disconnect_frees_slot(stories):
    """A client that gives up on a non-streaming request frees its batch slot too."""
    model, base = stories
    before = model.engine.stats["generated_tokens"]
    body = {
        "model": "stories260K",
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "temperature": 0,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while len(model.engine.free_slots) < BATCH or model.engine.running:
        assert time.monotonic() < deadline, "the abandoned request kept its slot"
        time.sleep(0.02)
    generated = model.engine.stats["generated_tokens"] - before
    assert generated < 480, generated


# ---------------------------------------------------------------------- QA findings
MSG = [{"role": "user", "content": "hi"}]
SURROGATE = [  # raw JSON: a lone surrogate escape anywhere is refused, naming the field
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "Once"}', "model"),
    ("/v1/completions", b'{"prompt": "abc\\ud800def", "max_tokens": 3}', "prompt"),
    ("/v1/completions", b'{"prompt": "abc", "stop": ["\\udfff"]}', "stop.0"),
    ("/v1/completions", b'{"prompt": "abc", "user": "\\ud83d"}', "user"),
    ("/generate", b'{"prompt": "\\ud83d", "max_length": 10}', "prompt"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages.0.content.0.text",
    ),
]


@pytest.mark.parametrize("path,raw,param", SURROGATE)
def test_lone_surrogates_are_400(stories, path, raw, param):
    r = httpx.post(f"{stories[1]}{path}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["message"] == f"'{param}' is not valid Unicode (lone surrogate)"
    # a valid surrogate pair (one astral character) is fine
    ok = b'{"prompt": "Once \\ud83d\\ude00", "max_tokens": 2}'
    r = httpx.post(
        f"{stories[1]}/v1/completions", content=ok, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text


BAD_PARAMS = [  # (path, body, param, words in the message)
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, "n", "valid integer"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, "seed", "valid integer"),
    ("/v1/completions", {"prompt": "x", "top_p": True}, "top_p", "valid number"),
    ("/v1/completions", {"prompt": "x", "logprobs": "1"}, "logprobs", "valid integer"),
    (
        "/v1/completions",
        {"prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
        "only allowed when stream is true",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "stop": [f"s{i}" for i in range(17)]},
        "stop",
        "at most 16",
    ),
    ("/v1/completions", {"prompt": "x", "stop": "z" * 1001}, "stop", "1000 characters"),
    ("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "0 is allowed with echo"),
    ("/v1/completions", {"prompt": ["x", ""]}, "prompt", "empty prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of", "not supported"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": -100}}, "logit_bias", "not supported"),
    (
        "/v1/chat/completions",
        {"messages": MSG, "tools": [{"type": "function"}]},
        "tools.0.function",
        "Field required",
    ),
    (
        "/v1/chat/completions",
        {"messages": MSG, "tool_choice": "auto"},
        "tool_choice",
        "needs tools",
    ),
    (
        "/v1/chat/completions",
        {"messages": MSG, "functions": [{"name": "f"}]},
        "functions",
        "not supported",
    ),
    (
        "/v1/chat/completions",
        {"messages": MSG, "response_format": {"type": "json_schema"}},
        "response_format",
        "needs a 'json_schema' object",
    ),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": 5}, "logprobs", "valid boolean"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        "messages.0.role",
        "'system', 'user', 'assistant', 'tool' or 'developer'",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0", "content is required"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": None}]},
        "messages.0",
        "content is required",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "messages.0.content",
        "invalid",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
        "only text content parts are supported",
    ),
    ("/generate", {"prompt": "x", "max_length": 0}, "max_length", "must be >= 1"),
    ("/generate", {"prompt": "x", "max_length": -5}, "max_length", "must be >= 1"),
]


@pytest.mark.parametrize(
    "path,body,param,words", BAD_PARAMS, ids=[str(i) for i in range(len(BAD_PARAMS))]
)
def test_bad_params_name_the_param(stories, path, body, param, words):
    r = httpx.post(f"{stories[1]}{path}", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_chat_accepts_every_role_and_text_parts(stories):
    """Valid messages pass validation (the 400 is only stories260K's missing template)."""
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    body = {"messages": messages, "response_format": {"type": "text"}, "tool_choice": "none"}
    r = httpx.post(f"{stories[1]}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template", r.text


@pytest.mark.parametrize(
    "raw,content_type",
    [
        (b"prompt=Once", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"null", "application/json"),
    ],
)
def test_non_object_bodies_say_so(stories, raw, content_type):
    r = httpx.post(
        f"{stories[1]}/v1/completions", content=raw, headers={"content-type": content_type}
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "the request body must be a JSON object sent with Content-Type: application/json"
    )


def test_body_over_8_mib_is_413(stories):
    big = json.dumps({"prompt": "a" * (8 * 1024 * 1024)}).encode()
    r = httpx.post(
        f"{stories[1]}/v1/completions", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while read
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = httpx.post(
        f"{stories[1]}/v1/completions",
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{stories[1]}/v1/completions", json={"prompt": "Once", "max_tokens": 2})
    assert r.status_code == 200


def test_huge_prompt_does_not_stall_other_clients(stories):
    """A multi-megabyte prompt is tokenized off the event loop: /health answers meanwhile."""
    base = stories[1]
    big = {"prompt": "Once upon a time " * 240_000, "max_tokens": 1}  # 4 MB, ~1M tokens
    result = {}

    def post_big() -> None:
        t = time.perf_counter()
        result["r"] = httpx.post(f"{base}/v1/completions", json=big, timeout=120)
        result["big_s"] = time.perf_counter() - t

    worker = threading.Thread(target=post_big)
    worker.start()
    time.sleep(0.5)  # the body is uploaded and tokenizing
    waits = []
    while worker.is_alive() and len(waits) < 10:
        t = time.perf_counter()
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        waits.append(time.perf_counter() - t)
        time.sleep(0.05)
    worker.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == (
        "context_length_exceeded"
    )
    # Relative, not absolute: a blocked loop would hold the first /health for the whole
    # tokenization, so few answers could come back before the big request ends.
    assert len(waits) >= 3, (waits, result["big_s"])
    assert max(waits) < result["big_s"] / 2, (waits, result["big_s"])


def test_completion_logprobs_tokens_and_offsets(client):
    """Tokens keep their leading spaces, join to the text, and text_offset is cumulative and
    equal to the streamed offsets (stories260K: SentencePiece with byte fallback)."""
    kw = dict(model="stories260K", prompt="Once upon a time", max_tokens=8, temperature=0)
    out = client.completions.create(**kw, logprobs=1).choices[0]
    lp = out.logprobs
    assert lp.tokens[:4] == [",", " there", " was", " a"]
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert list(lp.top_logprobs[1]) == [" there"]
    offsets, tokens = [], []
    for chunk in client.completions.create(**kw, logprobs=1, stream=True):
        if chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
            tokens += chunk.choices[0].logprobs.tokens
    assert offsets == lp.text_offset and tokens == lp.tokens


def test_chat_logprobs_bytes_are_the_tokens_bytes(chat_server):
    """Byte-level BPE (DeepSeek): each entry's bytes are its token's raw bytes (part of a
    character for a split one), so they join to the content's UTF-8."""
    out = chat_server.chat.completions.create(
        model="r1-debug",
        messages=[{"role": "user", "content": "Say hello to 世界"}],
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = out.choices[0]
    entries = choice.logprobs.content
    # special tokens (this random model samples some) are left out of the text
    text_entries = [t for t in entries if not re.fullmatch("<｜.*｜>", t.token)]
    joined = b"".join(bytes(t.bytes) for t in text_entries)
    assert joined.decode("utf-8", "replace") == choice.message.content
    for t in entries:
        if "\ufffd" not in t.token:
            assert bytes(t.bytes) == t.token.encode()
        assert all(
            bytes(a.bytes) == a.token.encode() or "\ufffd" in a.token for a in t.top_logprobs
        )
