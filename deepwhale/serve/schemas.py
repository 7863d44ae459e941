"""Request bodies of the server's endpoints, as pydantic models.

Field names, types and defaults follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/completions/create and
.../chat/create, .../responses/create); ``GenerateRequest`` follows the ``/generate`` body of DeepSeek's FastAPI
serving example (``prompt``, ``max_length``, ``temperature``, ``top_p``). Unknown fields are
ignored, as OpenAI-compatible servers do; known OpenAI fields this server cannot honour
(``functions``, ``logit_bias``, ``suffix``, ``best_of`` > 1...) are refused rather than silently
ignored. Structured output (``response_format``, vLLM's ``guided_*``) comes from
:mod:`deepwhale.serve.schemas_guided`.

Types are strict where OpenAI's are: integers and booleans must be JSON integers and booleans
(``"5"`` or ``true`` is not a ``max_tokens``); floats accept integers. Range checks live in
:class:`~deepwhale.inference.sampling.SamplingParams`, so the server and the Python API reject
the same values with the same messages.

Errors raised here with :func:`_fail` have the pydantic error type ``"deepwhale"``; the app
answers them with their message as is and the field's path as ``param``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from deepwhale.serve.schemas_guided import GuidedFields, text_format_spec
from deepwhale.serve.schemas_tools import ToolCall, ToolFields

Float = Annotated[float, Strict()]  # a JSON number (ints too), never a string or a bool

#: stop strings per request, and characters per stop string (OpenAI allows 4; vLLM no limit)
MAX_STOP = 16
MAX_STOP_CHARS = 1000
#: prompts per ``/v1/completions`` request (a list of strings or of token-id lists)
MAX_PROMPTS = 256
#: inputs per ``/v1/embeddings`` request (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidUnicodeError(Exception):
    """A string in the request body holds a lone UTF-16 surrogate (``"\\ud800"`` in JSON),
    which is not valid Unicode and cannot be encoded as UTF-8. ``param`` is its path."""

    def __init__(self, param: str) -> None:
        super().__init__(f"'{param}' is not valid Unicode (lone surrogate)")
        self.param = param


def _fail(message: str) -> PydanticCustomError:
    """A validation error answered with ``message`` verbatim (see the module docstring)."""
    return PydanticCustomError("deepwhale", message.replace("{", "(").replace("}", ")"))


def _find_surrogate(value: Any, path: str) -> str | None:
    """The dotted path of the first string (or key) under ``value`` with a lone surrogate."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return path or "body"
            found = _find_surrogate(v, sub)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_surrogate(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Root(_Body):
    """A whole request body: refuses lone surrogates anywhere in it, unknown fields included
    (raises :class:`InvalidUnicodeError`, answered as a 400)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = _find_surrogate(data, "")
        if found:
            raise InvalidUnicodeError(found)
        return data


def _check_stop(stop: str | list[str] | None) -> str | list[str] | None:
    items = [stop] if isinstance(stop, str) else stop or []
    if len(items) > MAX_STOP:
        raise _fail(f"stop may hold at most {MAX_STOP} strings, got {len(items)}")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise _fail(f"each stop string may be at most {MAX_STOP_CHARS} characters long")
    return stop


def _unsupported(name: str) -> PydanticCustomError:
    return _fail(f"{name} is not supported by this server")


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with empty ``choices`` and the
    request's ``usage``."""

    include_usage: StrictBool = False


class SamplingFields(_Root):
    """Sampling fields shared by the OpenAI endpoints (plus vLLM-style extensions); the serving
    layer turns them into one :class:`~deepwhale.inference.sampling.SamplingParams`."""

    model: StrictStr | None = None
    temperature: Float = 1.0
    top_p: Float = 1.0
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict | None = None
    # extensions (vLLM names), not in OpenAI's API
    top_k: StrictInt = 0
    min_p: Float = 0.0
    repetition_penalty: Float = 1.0
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(v)

    @field_validator("stream_options")
    @classmethod
    def _needs_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise _fail("stream_options is only allowed when stream is true")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise _unsupported("logit_bias")
        return v


class CompletionRequest(SamplingFields, GuidedFields):
    """``POST /v1/completions`` body (OpenAI legacy completions).

    Attributes:
        prompt: a string, a list of strings, a list of token ids, or a list of token-id lists
            (at most :data:`MAX_PROMPTS` prompts; choice ``i * n + j`` is sample ``j`` of
            prompt ``i``, as OpenAI numbers them).
        max_tokens: new tokens at most (OpenAI's default 16); None fills the context; 0 (with
            ``echo``) only scores the prompt.
        logprobs: report each token's log-probability and this many alternatives (0-20).
        echo: put the prompt in front of the completion, and with ``logprobs`` the prompt
            tokens' log-probabilities too (the first one ``null``, as OpenAI did); used by
            lm-evaluation-harness's ``local-completions`` to score log-likelihoods. Not with
            ``stream``.
        response_format, guided_json, guided_regex, guided_choice, guided_grammar: structured
            output (:class:`~deepwhale.serve.schemas_guided.GuidedFields`).
        suffix, best_of > 1: not supported (400).
    """

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: str | list) -> str | list:
        if isinstance(v, list):
            if not v:
                raise _fail("prompt must not be an empty list")
            if len(v) > MAX_PROMPTS:
                raise _fail(f"prompt may hold at most {MAX_PROMPTS} prompts, got {len(v)}")
            if any(p == [] or p == "" for p in v):
                raise _fail("prompt must not hold an empty prompt")
        return v

    @field_validator("echo")
    @classmethod
    def _echo_not_streamed(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("stream"):
            raise _fail("echo is not supported with stream")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per list entry: strings or token-id lists."""
        return _one_per_entry(self.prompt)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _unsupported("suffix")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise _fail("best_of other than 1 is not supported by this server")
        return v


class ChatMessage(_Body):
    """One message: ``role`` (system, user, assistant, tool or developer) and ``content`` (a
    string, or a list of ``{"type": "text", "text": ...}`` parts, which are joined). Content may
    be missing or null only in an assistant message; non-text parts are refused. An assistant
    message may carry ``tool_calls`` (:class:`ToolCall`), a ``tool`` message the
    ``tool_call_id`` it answers."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict] | None) -> str | list[dict] | None:
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text":
                    raise _fail(
                        "only text content parts are supported (got a part of type "
                        f"'{part.get('type')}')"
                    )
                if not isinstance(part.get("text"), str):
                    raise _fail("a text content part needs a string 'text'")
        return content

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise _fail(f"content is required in a {self.role} message")
        return self


class ChatCompletionRequest(SamplingFields, ToolFields, GuidedFields):
    """``POST /v1/chat/completions`` body (OpenAI chat completions).

    Attributes:
        messages: the conversation, rendered with the model's chat template.
        max_tokens / max_completion_tokens: new tokens at most; None fills the context.
        logprobs: return per-token log-probabilities.
        top_logprobs: alternatives per token (0-20); needs ``logprobs``.
        tools, tool_choice, parallel_tool_calls: see
            :class:`~deepwhale.serve.schemas_tools.ToolFields`.
        response_format, guided_json, guided_regex, guided_choice, guided_grammar: structured
            output (:class:`~deepwhale.serve.schemas_guided.GuidedFields`).
        functions, function_call (OpenAI's deprecated forms): not supported (400).
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    functions: list | None = None
    function_call: Any = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list | None, info: ValidationInfo) -> list | None:
        if v:
            raise _unsupported(info.field_name)
        return v

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v != "none":
            raise _unsupported(info.field_name)
        return v


class ResponseInputMessage(_Body):
    """One message item of a ``/v1/responses`` ``input`` list (OpenAI's ``EasyInputMessage`` /
    input message): ``role`` (user, system, developer or assistant), ``content`` a string or a
    list of ``{"type": "input_text" | "output_text", "text": ...}`` parts (joined), and
    optionally ``"type": "message"``. Other item types (tool calls and outputs, reasoning,
    item references) and non-text parts are refused."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[dict]

    @field_validator("type", mode="before")
    @classmethod
    def _message_only(cls, v: Any) -> Any:
        if v != "message":
            raise _fail(
                f"only input items of type 'message' are supported by this server (got {v!r})"
            )
        return v

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict]) -> str | list[dict]:
        if isinstance(content, list):
            for part in content:
                if part.get("type") not in ("input_text", "output_text"):
                    raise _fail(
                        "only input_text and output_text content parts are supported (got a "
                        f"part of type '{part.get('type')}')"
                    )
                if not isinstance(part.get("text"), str):
                    raise _fail(f"a {part['type']} content part needs a string 'text'")
        return content

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p["text"] for p in self.content)


class ResponseRequest(SamplingFields):
    """``POST /v1/responses`` body (OpenAI Responses API, stateless subset, as vLLM serves it;
    https://platform.openai.com/docs/api-reference/responses/create). The sampling extensions
    of :class:`SamplingFields` (``top_k``, ``seed``, ``stop``, ...) are accepted as vLLM does.

    Attributes:
        input: a string (one user message) or a list of :class:`ResponseInputMessage`; parsed
            as the list either way.
        instructions: a system message put before ``input``.
        max_output_tokens: new tokens at most; None fills the context.
        text: ``format`` ``json_object`` or ``json_schema`` constrains the output
            (structured output, as ``response_format`` does on chat).
        store: accepted, but nothing is stored (the response says ``"store": false``).
        user, metadata, parallel_tool_calls, truncation ``"disabled"``: accepted, echoed.
        previous_response_id, conversation (stateful), background, prompt, non-empty
            ``tools``, ``tool_choice`` other than none/auto, ``reasoning``, non-empty ``include``, ``top_logprobs`` > 0, ``truncation``
            ``"auto"``, ``n`` other than 1: not supported (400 naming the field).
    """

    input: list[ResponseInputMessage]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    store: StrictBool | None = None
    user: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    parallel_tool_calls: StrictBool = True
    truncation: Literal["disabled", "auto"] | None = None
    previous_response_id: StrictStr | None = None
    conversation: Any = None
    background: StrictBool | None = None
    prompt: Any = None
    tools: list | None = None
    tool_choice: Any = None
    reasoning: dict | None = None
    text: dict | None = None
    include: list | None = None
    top_logprobs: StrictInt | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _string_is_a_user_message(cls, v: Any) -> Any:
        # a string is one user message (OpenAI's semantics); done before validation so that a
        # bad item is reported at its own path, not as "not a string" of a union
        if v == "" or v == []:
            raise _fail("input must not be empty")
        if isinstance(v, str):
            return [{"type": "message", "role": "user", "content": v}]
        if not isinstance(v, list):
            raise _fail("input must be a string or a list of message items")
        return v

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _stateless(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            raise _fail(
                f"{info.field_name} is not supported: this server does not store responses "
                "(stateful responses are not supported); send the whole conversation as input"
            )
        return v

    @field_validator("tools", "include", "prompt", "reasoning")
    @classmethod
    def _none_or_empty(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise _unsupported(info.field_name)
        return v

    @field_validator("background")
    @classmethod
    def _not_background(cls, v: bool | None) -> bool | None:
        if v:
            raise _unsupported("background")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):
            raise _unsupported("tool_choice")
        return v

    @field_validator("text")
    @classmethod
    def _text_format(cls, v: dict | None) -> dict | None:
        text_format_spec((v or {}).get("format"))  # raises for a malformed format
        return v

    def guided_spec(self) -> dict[str, Any] | None:
        """``text.format`` as keyword arguments of ``GuidedDecoding`` (json_object or
        json_schema; see :func:`~deepwhale.serve.schemas_guided.text_format_spec`), or None."""
        return text_format_spec((self.text or {}).get("format"))

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise _unsupported("top_logprobs")
        return v

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, v: str | None) -> str | None:
        if v == "auto":
            raise _fail("truncation 'auto' is not supported by this server")
        return v

    @field_validator("n")
    @classmethod
    def _one_output(cls, v: int) -> int:
        if v != 1:
            raise _fail("n other than 1 is not supported by /v1/responses")
        return v


class EmbeddingRequest(_Root):
    """``POST /v1/embeddings`` body (OpenAI embeddings, plus vLLM-style ``pooling``).

    Attributes:
        input: a string, a list of strings, a list of token ids, or a list of token-id lists
            (at most :data:`MAX_EMBEDDING_INPUTS`, none empty); ``data[i]`` is input ``i``.
        encoding_format: ``"float"`` (JSON numbers) or ``"base64"`` (the little-endian float32
            bytes, base64-encoded, as OpenAI's client decodes them).
        dimensions: only the model's hidden size is supported (anything else: 400).
        pooling: extension: ``"mean"`` or ``"last"``; None: the server's default.
        user: accepted and ignored.
    """

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    pooling: Literal["mean", "last"] | None = None
    user: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _input_shape(cls, v: str | list) -> str | list:
        if v == "":
            raise _fail("input must not be an empty string")
        if isinstance(v, list):
            if not v:
                raise _fail("input must not be an empty list")
            if len(v) > MAX_EMBEDDING_INPUTS:
                raise _fail(f"input may hold at most {MAX_EMBEDDING_INPUTS} inputs, got {len(v)}")
            if any(p == [] or p == "" for p in v):
                raise _fail("input must not hold an empty input")
        return v

    def inputs(self) -> list[str | list[int]]:
        """The inputs, one per list entry: strings or token-id lists."""
        return _one_per_entry(self.input)


class TokenizeRequest(_Root):
    """``POST /tokenize`` body (vLLM's): ``prompt`` text, ``add_special_tokens`` (default true:
    the tokenizer's BOS/EOS rule; false: the text's own tokens only)."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Root):
    """``POST /detokenize`` body (vLLM's): ``tokens``, a list of token ids."""

    model: StrictStr | None = None
    tokens: list[StrictInt]


class GenerateRequest(_Root):
    """``POST /generate`` body, the shape of DeepSeek's FastAPI example.

    Attributes:
        prompt: text to continue.
        max_length: total tokens, prompt included (HF ``generate`` / ``generate_text``
            semantics); >= 1.
        max_new_tokens: if given, new tokens instead of ``max_length``.
        temperature, top_p, top_k, seed, stop: as in :class:`SamplingParams`.
    """

    prompt: StrictStr
    max_length: StrictInt = 200
    max_new_tokens: StrictInt | None = None
    temperature: Float = 0.7
    top_p: Float = 0.9
    top_k: StrictInt = 0
    min_p: Float = 0.0
    repetition_penalty: Float = 1.0
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(v)

    @field_validator("max_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise _fail(f"max_length must be >= 1, got {v}")
        return v


SamplingFields.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
ResponseRequest.model_rebuild()


def _one_per_entry(x) -> list[str | list[int]]:
    """A prompt field as a list with one entry per prompt: a string or one token-id list is a
    single prompt; a list of strings / token-id lists is several (OpenAI's ``prompt`` and
    ``input`` shapes)."""
    if isinstance(x, str) or (x and isinstance(x[0], int)):
        return [x]
    return list(x)
