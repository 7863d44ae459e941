"""``POST /v1/responses`` end to end: a real uvicorn server on 127.0.0.1 (API keys and the audit
log on) serving a random debug-v3 model with the real DeepSeek-R1 chat template, driven by the
real ``openai`` client (``responses.create``, ``responses.stream``) and raw httpx; the answers are
checked against ``/v1/chat/completions`` for the same messages at temperature 0."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from deepwhale.serve.audit import verify  # noqa: E402
from deepwhale.serve.auth import KeyStore  # noqa: E402
from tests.serve.conftest import r1_debug_folder, serve_in_thread  # noqa: E402

NAME = "r1-debug"
QUESTION = "What is 1+1?"
EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
CLOSING = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(client, base, key, home, model)``: the openai client with a user key, the server URL,
    the key, the data folder holding ``audit.sqlite``, and the served model."""
    model = DeepSeekModel.from_pretrained(r1_debug_folder(tmp_path_factory), device="cpu")
    home = tmp_path_factory.mktemp("responses-home")
    key, _ = KeyStore(home / "keys.sqlite").create("app", "user")
    app = create_app(model.set_batch_size(4, 256), NAME, data_dir=home, auth=True)
    for base in serve_in_thread(app):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)
        yield client, base, key, home, model


def _chat(client, messages: list[dict], max_tokens: int):
    return client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, temperature=0
    )


def _post(served, body: dict, key: str | None = "") -> httpx.Response:
    _, base, own, _, _ = served
    key = own if key == "" else key
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{base}/v1/responses", json=body, headers=headers, timeout=60)


def test_output_text_equals_chat(served):
    client = served[0]
    resp = client.responses.create(model=NAME, input=QUESTION, max_output_tokens=64, temperature=0)
    chat = _chat(client, [{"role": "user", "content": QUESTION}], 64)
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.model == NAME and resp.created_at > 0
    assert resp.output_text == chat.choices[0].message.content
    [item] = resp.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [p.type for p in item.content] == ["output_text"] and item.content[0].annotations == []
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == chat.usage.total_tokens
    assert resp.usage.input_tokens_details.cached_tokens == 0
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    finished = chat.choices[0].finish_reason
    assert resp.status == ("incomplete" if finished == "length" else "completed")
    assert resp.temperature == 0 and resp.max_output_tokens == 64 and resp.tools == []


def test_instructions_and_message_items(served):
    """``instructions`` is a leading system message; items with text parts (input_text,
    output_text), ``type: message`` or not, and the developer role mean what chat means."""
    client = served[0]
    system = "You are a terse assistant."
    chat = _chat(
        client,
        [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION},
        ],
        8,
    )
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": QUESTION},
    ]
    by_instructions = client.responses.create(
        model=NAME, instructions=system, input=items, max_output_tokens=8, temperature=0
    )
    by_developer = client.responses.create(
        model=NAME,
        input=[{"role": "developer", "content": system}, *items],
        max_output_tokens=8,
        temperature=0,
    )
    for resp in (by_instructions, by_developer):
        assert resp.output_text == chat.choices[0].message.content
        assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert by_instructions.instructions == system


def test_max_output_tokens_makes_it_incomplete(served):
    resp = served[0].responses.create(
        model=NAME, input=QUESTION, max_output_tokens=2, temperature=0
    )
    chat = _chat(served[0], [{"role": "user", "content": QUESTION}], 2)
    assert chat.choices[0].finish_reason == "length"  # the random model does not stop in 2
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and resp.usage.output_tokens == 2
    assert resp.output_text == chat.choices[0].message.content


def test_stream_events(served):
    client = served[0]
    kw = dict(model=NAME, input=QUESTION, max_output_tokens=24, temperature=0)
    text = client.responses.create(**kw).output_text
    # a stop string (vLLM's extension) from the middle of the greedy text ends it "completed"
    half = len(text) // 2
    stop = next((c for c in text[half:] if not c.isspace() and c not in text[:half]), "")
    assert stop, text
    kw["extra_body"] = {"stop": [stop]}
    final = client.responses.create(**kw)
    assert final.status == "completed" and final.output_text == text[: text.index(stop)]
    events = list(client.responses.create(**kw, stream=True))
    types = [e.type for e in events]
    n_deltas = types.count("response.output_text.delta")
    assert n_deltas >= 1
    expected = EVENTS + ["response.output_text.delta"] * n_deltas + CLOSING
    assert types == [*expected, "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == events[-4].text
    last = events[-1].response
    assert last.output_text == final.output_text and last.usage == final.usage
    assert last.status == "completed" and last.id == events[0].response.id
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert all(getattr(e, "item_id", item_id) == item_id for e in events)
    assert last.output[0].id == item_id

    # the helper that accumulates the events agrees
    with client.responses.stream(**kw) as stream:
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        assert stream.get_final_response().output_text == streamed == final.output_text

    # stopped by max_output_tokens: the same events, ending in response.incomplete
    kw.pop("extra_body")
    events = list(client.responses.create(**kw, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text == events[-1].response.output_text


def test_stream_wire_format(served):
    """Each SSE event has an ``event:`` line naming the ``type`` in its ``data:``."""
    _, base, key, _, _ = served
    body = {"model": NAME, "input": QUESTION, "max_output_tokens": 3, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{base}/v1/responses", json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line and not line.startswith(":")]
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data] and names[-1] == "response.incomplete"
    assert "[DONE]" not in "\n".join(lines)


def test_disconnect_aborts_the_engine_request(served):
    client, *_, model = served
    before = model.engine.stats["generated_tokens"]
    stream = client.responses.create(
        model=NAME, input=QUESTION, max_output_tokens=200, temperature=0, stream=True
    )
    for e in stream:
        if e.type == "response.output_text.delta":
            break
    stream.close()
    deadline = time.monotonic() + 10
    while len(model.engine.free_slots) < 4 or model.engine.running:
        assert time.monotonic() < deadline, "the disconnected request kept its slot"
        time.sleep(0.02)
    assert model.engine.stats["generated_tokens"] - before < 200  # cancelled, not run out
    home = served[3]
    while not any(r["status"] == 499 for r in _audit_rows(home)):  # audited as the client left
        assert time.monotonic() < deadline + 10, "no 499 audit row for the disconnected stream"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateful"),
        ({"conversation": "conv_1"}, "conversation", "stateful"),
        ({"tools": [{"type": "function", "name": "f"}]}, "tools", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "not supported"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
        ({"text": {"format": {"type": "yaml"}}}, "text", "text.format must have type"),
        ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
        ({"background": True}, "background", "not supported"),
        ({"truncation": "auto"}, "truncation", "truncation"),
        ({"top_logprobs": 2}, "top_logprobs", "not supported"),
        ({"n": 2}, "n", "n other than 1"),
        ({"input": ""}, "input", "must not be empty"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": 5}, "input", "a string or a list"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
            "input.0.type",
            "type 'message'",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input.0.content",
            "input_text",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "user"),
        ({"max_output_tokens": 0}, "max_output_tokens", ">= 1"),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "maximum context length"),
        ({"temperature": "hot"}, "temperature", "number"),
        ({"model": "other"}, "model", "does not exist"),
    ],
)
def test_bad_input_is_400_naming_the_field(served, body, param, words):
    r = _post(served, {"model": NAME, "input": QUESTION, **body})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


def test_accepted_fields_and_unknown_ones_ignored(served):
    body = {
        "model": NAME,
        "input": QUESTION,
        "max_output_tokens": 2,
        "store": True,
        "user": "u-1",
        "metadata": {"k": "v"},
        "text": {"format": {"type": "text"}},
        "tools": [],
        "tool_choice": "auto",
        "truncation": "disabled",
        "no_such_field": 1,
    }
    r = _post(served, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["store"] is False and out["user"] == "u-1" and out["metadata"] == {"k": "v"}


def _audit_rows(home) -> list[dict]:
    db = sqlite3.connect(home / "audit.sqlite")
    db.row_factory = sqlite3.Row
    try:
        sql = "SELECT * FROM audit WHERE route = '/v1/responses' ORDER BY id"
        return [dict(r) for r in db.execute(sql)]
    finally:
        db.close()


def test_auth_and_audit(served):
    client, _, key, home, _ = served
    r = _post(served, {"model": NAME, "input": QUESTION}, key=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _post(served, {"input": QUESTION}, key="dw-nope").status_code == 401
    resp = client.responses.create(model=NAME, input=QUESTION, max_output_tokens=3)
    deadline = time.monotonic() + 10  # the row is written after the last byte is sent
    while True:
        rows = _audit_rows(home)
        if rows[-1]["status"] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    last = rows[-1]
    assert last["status"] == 200 and last["model"] == NAME and last["key_id"] is not None
    assert last["prompt_tokens"] == resp.usage.input_tokens
    assert last["completion_tokens"] == resp.usage.output_tokens == 3
    assert [r["status"] for r in rows if r["key_id"] is None][-2:] == [401, 401]
    assert verify(home / "audit.sqlite").ok


def test_metrics_count_the_route(served):
    _, base, _, home, _ = served
    served[0].responses.create(model=NAME, input=QUESTION, max_output_tokens=1)
    viewer, _ = KeyStore(home / "keys.sqlite").create("ops", "viewer")
    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 200
    assert 'deepwhale_requests_total{route="/v1/responses",status="200"}' in r.text
    assert 'deepwhale_request_latency_seconds_count{route="/v1/responses"}' in r.text


def test_previous_output_items_can_be_sent_back_as_input(served):
    """A response's ``output`` items (with their ``id``/``status``/``annotations``) are valid
    input items: the stateless way to continue a conversation."""
    client = served[0]
    first = client.responses.create(model=NAME, input=QUESTION, max_output_tokens=4, temperature=0)
    items = [
        {"role": "user", "content": QUESTION},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"role": "user", "content": "And 2+2?"},
    ]
    resp = client.responses.create(model=NAME, input=items, max_output_tokens=4, temperature=0)
    chat = _chat(
        client,
        [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And 2+2?"},
        ],
        4,
    )
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens


def test_model_without_chat_template_is_400():
    from fastapi.testclient import TestClient

    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(1, 64)  # stories260K
    with TestClient(create_app(model, "stories260K")) as client:
        r = client.post("/v1/responses", json={"input": "Once upon a time"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "no_chat_template" and err["param"] == "input"
    assert "chat template" in err["message"]
