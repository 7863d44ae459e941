"""Reasoning content and tool calls on /v1/chat/completions, against a live server on 127.0.0.1,
with the official ``openai`` client and LangChain's ``ChatOpenAI.bind_tools``.

The model is :mod:`tests.serve.scripted`: a real DeepSeek-V3-shaped model run by the real
engine, with weights set so that it writes a fixed R1-style answer (``<think>`` reasoning, a
little content, one DeepSeek tool call) after the R1 template's generation prompt, and a fixed
text after tool results. These tests prove what the server does with such output (template
rendering of tools and tool history, the reasoning/content/tool-call split, streaming, finish
reasons, the ``tool_choice`` checks); they do not prove that a real R1 writes it.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from tests.serve.conftest import serve_in_thread  # noqa: E402
from tests.serve.scripted import (  # noqa: E402
    AFTER_TOOL,
    ANSWER,
    ARGUMENTS,
    CALL_TEXT,
    CONTENT,
    REASONING,
    scripted_r1_folder,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "What is the weather in Lyon?"}]
HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 24}'},
]
#: the R1 template with the newer generation prompt that opens <think> itself
OPENS_THINK = "<｜Assistant｜><think>\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return scripted_r1_folder(tmp_path_factory)


def _serve(folder, **kwargs):
    model = DeepSeekModel.from_pretrained(folder, device="cpu")
    model.set_batch_size(4, 512)
    yield from serve_in_thread(create_app(model, "r1-scripted", **kwargs))


@pytest.fixture(scope="module")
def base(folder):
    yield from _serve(folder)


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def _chat(client, **kwargs):
    return client.chat.completions.create(model="r1-scripted", max_tokens=80, **kwargs)


def _stream(client, **kwargs) -> list:
    return list(_chat(client, stream=True, **kwargs))


def _joined(chunks, field: str) -> str:
    return "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks if c.choices)


# ------------------------------------------------------------------ reasoning


def test_reasoning_split_non_streaming(client):
    r = _chat(client, messages=ASK, temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING
    # no tools in the request: the call markup is plain content, as the model wrote it
    assert msg.content == CONTENT + CALL_TEXT and msg.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    # reasoning tokens: <think>, "\n", the reasoning's tokens and </think>
    assert r.usage.completion_tokens_details.reasoning_tokens == 13
    assert r.usage.completion_tokens > 13


def test_reasoning_streamed_as_its_own_delta(client):
    chunks = _stream(client, messages=ASK, stream_options={"include_usage": True})
    assert _joined(chunks, "reasoning_content") == REASONING
    assert _joined(chunks, "content") == CONTENT + CALL_TEXT
    kinds = [
        "r" if getattr(c.choices[0].delta, "reasoning_content", None) else "c"
        for c in chunks
        if c.choices and (c.choices[0].delta.content or c.choices[0].delta.model_extra)
    ]
    assert kinds == sorted(kinds, reverse=True), "all reasoning comes before any content"
    assert all("<think>" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 13


def test_prompt_that_opens_think(folder):
    """A template whose generation prompt ends in <think>\\n (newer R1 templates): the model
    continues inside the reasoning without writing <think>, and it is still split."""
    template = DeepSeekModel.from_pretrained(folder).tokenizer.chat_template
    template = template.replace(
        "{{'<｜Assistant｜>'}}{% endif %}", "{{'" + OPENS_THINK + "'}}{% endif %}"
    )
    assert OPENS_THINK in template
    for base in _serve(folder, chat_template=template):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        r = _chat(c, messages=ASK, temperature=0)
        assert r.choices[0].message.reasoning_content == REASONING
        assert r.choices[0].message.content == CONTENT + CALL_TEXT
        assert r.usage.completion_tokens_details.reasoning_tokens == 11  # no <think>, no "\n"
        assert _joined(_stream(c, messages=ASK), "reasoning_content") == REASONING


def test_reasoning_parser_none_keeps_the_raw_text(folder):
    for base in _serve(folder, reasoning_parser="none"):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        r = _chat(c, messages=ASK)
        assert r.choices[0].message.content == ANSWER
        assert "reasoning_content" not in r.choices[0].message.model_extra
        assert _joined(_stream(c, messages=ASK), "content") == ANSWER


def test_bad_reasoning_parser_name(folder):
    with pytest.raises(ValueError, match="reasoning_parser must be one of"):
        create_app(DeepSeekModel.from_pretrained(folder), reasoning_parser="r1")


# ------------------------------------------------------------------ tool calls


def test_tool_call_non_streaming(client):
    r = _chat(client, messages=ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS
    assert choice.message.content == CONTENT
    assert choice.message.reasoning_content == REASONING


def test_tool_call_streaming(client):
    chunks = _stream(client, messages=ASK, tools=[WEATHER], tool_choice="auto")
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    (only,) = deltas
    assert only[0].index == 0 and only[0].function.name == "get_weather"
    assert json.loads(only[0].function.arguments) == ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert _joined(chunks, "content") == CONTENT
    assert _joined(chunks, "reasoning_content") == REASONING


def test_openai_stream_helper_accumulates_the_call(client):
    with client.chat.completions.stream(
        model="r1-scripted", messages=ASK, tools=[WEATHER], max_tokens=80
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGUMENTS


def test_named_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(client, messages=ASK, tools=[TIME, WEATHER], tool_choice=named)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    # naming another tool: the model still writes get_weather, which is not a valid call now
    other = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _chat(client, messages=ASK, tools=[TIME, WEATHER], tool_choice=other)
    assert e.value.body["code"] == "tool_call_missing"


def test_tool_history_and_required_without_a_call(client):
    """Assistant tool_calls and tool results render through R1's template (the model's answer
    after them proves the prompt ended with <｜tool▁outputs▁end｜>); with tool_choice required
    and no call in the answer, the server says so instead of answering."""
    r = _chat(client, messages=HISTORY, tools=[WEATHER])
    assert r.choices[0].message.content == AFTER_TOOL
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _chat(client, messages=HISTORY, tools=[WEATHER], tool_choice="required")
    err = e.value.body
    assert err["code"] == "tool_call_missing" and err["param"] == "tool_choice"
    assert "does not constrain decoding" in err["message"] and AFTER_TOOL in err["message"]
    with pytest.raises(openai.APIError, match="tool call"):
        _stream(client, messages=HISTORY, tools=[WEATHER], tool_choice="required")


def test_tool_choice_none_shows_no_tools_and_parses_nothing(client):
    with_tools = _chat(client, messages=ASK, tools=[WEATHER])
    none = _chat(client, messages=ASK, tools=[WEATHER], tool_choice="none")
    plain = _chat(client, messages=ASK)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools' system text
    assert none.choices[0].message.content == CONTENT + CALL_TEXT
    assert none.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_is_accepted(client):
    r = _chat(client, messages=ASK, tools=[WEATHER], parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize(
    "body,param,words",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "invalid"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "Field required"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "tools.0.function.name",
            "1-64 of",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
            "type 'object'",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "invalid"),
    ],
)
def test_bad_tools_are_400(base, body, param, words):
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert words in err["message"], err


def test_langchain_bind_tools(base):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    llm = lc.ChatOpenAI(base_url=f"{base}/v1", api_key="none", model="r1-scripted", max_retries=0)
    bound = llm.bind_tools([get_weather])
    msg = bound.invoke("What is the weather in Lyon?")
    assert msg.tool_calls == [
        {
            "name": "get_weather",
            "args": ARGUMENTS,
            "id": msg.tool_calls[0]["id"],
            "type": "tool_call",
        }
    ]
    chunks = list(bound.stream("What is the weather in Lyon?"))
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert [(t["name"], t["args"]) for t in total.tool_calls] == [("get_weather", ARGUMENTS)]
    # the tool result goes back as a ToolMessage; the model's answer after it is plain text
    from langchain_core.messages import HumanMessage, ToolMessage

    answer = bound.invoke(
        [
            HumanMessage("What is the weather in Lyon?"),
            msg,
            ToolMessage("sunny", tool_call_id=msg.tool_calls[0]["id"]),
        ]
    )
    assert answer.content == AFTER_TOOL and not answer.tool_calls


def test_structured_output_is_content_even_when_the_prompt_opens_think(folder):
    """With a grammar the whole output is the constrained content: no reasoning split, even
    where the template leaves the model inside <think>."""
    template = DeepSeekModel.from_pretrained(folder).tokenizer.chat_template
    template = template.replace(
        "{{'<｜Assistant｜>'}}{% endif %}", "{{'" + OPENS_THINK + "'}}{% endif %}"
    )
    for base in _serve(folder, chat_template=template):
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(
            model="r1-scripted",
            messages=ASK,
            temperature=0,
            max_tokens=20,
            extra_body={"guided_choice": ["sunny", "rainy"]},
        )
        msg = r.choices[0].message
        assert msg.content in ("sunny", "rainy") and r.choices[0].finish_reason == "stop"
        assert getattr(msg, "reasoning_content", None) is None
