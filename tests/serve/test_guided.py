"""Structured output over HTTP against a live server on 127.0.0.1: OpenAI's ``response_format``
(``json_object``, ``json_schema`` through ``openai``'s ``chat.completions.parse`` and LangChain's
``with_structured_output``), the Responses API's ``text.format``, and vLLM's ``guided_*`` fields
through ``extra_body``, streamed and not; malformed constraints are 400s with a JSON body.

The models have random or tiny weights, so what is proven is the constraint: every output
parses and validates, whatever the model would have written unconstrained.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

from deepwhale.api import DeepSeekModel  # noqa: E402
from deepwhale.serve import create_app  # noqa: E402
from tests.serve.conftest import r1_debug_folder, serve_in_thread  # noqa: E402


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    kind: str = pydantic.Field(pattern="^(cat|dog|bird)$")
    age: int = pydantic.Field(ge=0, le=30)


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -5, "maximum": 99},
    },
    "required": ["ok", "n"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A random DeepSeek-V3-shaped model with the real DeepSeek-R1 tokenizer and template."""
    model = DeepSeekModel.from_pretrained(r1_debug_folder(tmp_path_factory), device="cpu")
    model.set_batch_size(4, 256)
    yield from serve_in_thread(create_app(model, "r1-debug"))


@pytest.fixture(scope="module")
def chat(chat_base):
    return openai.OpenAI(base_url=f"{chat_base}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stories_base():
    model = DeepSeekModel.from_pretrained(device="cpu").set_batch_size(4)
    yield from serve_in_thread(create_app(model, "stories260K"))


@pytest.fixture(scope="module")
def stories(stories_base):
    return openai.OpenAI(base_url=f"{stories_base}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_parse_with_a_pydantic_model(chat, temperature):
    done = chat.chat.completions.parse(
        model="r1-debug",
        messages=ASK,
        response_format=Pet,
        max_tokens=80,
        temperature=temperature,
        seed=3,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    pet = choice.message.parsed
    assert isinstance(pet, Pet)
    assert Pet.model_validate_json(choice.message.content) == pet


def test_json_object_and_raw_json_schema(chat):
    out = chat.chat.completions.create(
        model="r1-debug",
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0.7,
        seed=1,
        n=2,
    )
    for choice in out.choices:
        if choice.finish_reason == "stop":  # a length cut may stop inside the object
            assert isinstance(json.loads(choice.message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "flags", "schema": SCHEMA}}
    out = chat.chat.completions.create(
        model="r1-debug", messages=ASK, response_format=fmt, max_tokens=60, temperature=0
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_streamed_chat_follows_the_schema(chat):
    stream = chat.chat.completions.create(
        model="r1-debug",
        messages=ASK,
        extra_body={"guided_json": SCHEMA},
        max_tokens=60,
        temperature=1.0,
        seed=7,
        stream=True,
    )
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_langchain_with_structured_output(chat_base):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        base_url=f"{chat_base}/v1",
        api_key="x",
        model="r1-debug",
        max_tokens=80,
        temperature=0,
        max_retries=0,
    )
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)


def test_completions_regex_and_choice(stories):
    regex = r"[A-Z][a-z]{2,6} (is|was) [0-9]{1,3}"
    out = stories.completions.create(
        model="stories260K",
        prompt=["Once upon a time", "Lily"],
        max_tokens=40,
        temperature=1.0,
        seed=0,
        extra_body={"guided_regex": regex},
    )
    assert len(out.choices) == 2
    for c in out.choices:
        assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), c.text
    choices = ["Lily", "Ben", 'the "dog"']
    stream = stories.completions.create(
        model="stories260K",
        prompt="The name was",
        max_tokens=20,
        n=3,
        temperature=1.0,
        seed=2,
        stream=True,
        extra_body={"guided_choice": choices},
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert len(texts) == 3 and all(t in choices for t in texts.values()), texts


def test_completions_grammar_and_responses_text_format(stories, chat):
    grammar = 'start: "yes" | "no" | NUM\nNUM: /[0-9]{2}/\n'
    out = stories.completions.create(
        model="stories260K",
        prompt="Answer:",
        max_tokens=10,
        extra_body={"guided_grammar": grammar},
    )
    assert re.fullmatch(r"yes|no|[0-9]{2}", out.choices[0].text)
    resp = chat.responses.create(
        model="r1-debug",
        input="Lily had a cat.",
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "flags", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(resp.output_text), SCHEMA)


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"guided_regex": "[a-"}, "unclosed"),
        ({"guided_json": {"type": "nonsense"}}, "nonsense"),
        ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
        ({"guided_grammar": "start: foo"}, "foo"),
        ({"guided_choice": []}, "choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "at most one"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "at most one"),
        ({"response_format": {"type": "json_schema"}}, "needs a 'json_schema'"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "llguidance"),
    ],
)
def test_bad_constraints_are_400s(stories_base, chat_base, extra, reason):
    body = {"model": "stories260K", "prompt": "Lily", "max_tokens": 5, **extra}
    r = httpx.post(f"{stories_base}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"]
    chat_body = {"model": "r1-debug", "messages": ASK, "max_tokens": 5, **extra}
    r = httpx.post(f"{chat_base}/v1/chat/completions", json=chat_body, timeout=30)
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
