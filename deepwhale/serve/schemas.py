"""Request bodies of the server's endpoints, as pydantic models.

Field names, types and defaults follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference/completions/create and
.../chat/create); ``GenerateRequest`` follows the ``/generate`` body of DeepSeek's FastAPI
serving example (``prompt``, ``max_length``, ``temperature``, ``top_p``). Unknown fields are
ignored, as OpenAI-compatible servers do. Range checks live in
:class:`~deepwhale.inference.sampling.SamplingParams`, so the server and the Python API reject
the same values with the same messages.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (plus vLLM-style extensions)."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM names), not in OpenAI's API
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with empty ``choices`` and the
    request's ``usage``."""

    include_usage: bool = False


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` body (OpenAI legacy completions).

    Attributes:
        prompt: one text prompt (arrays of prompts are not supported).
        max_tokens: new tokens at most (OpenAI's default 16); None fills the context.
        logprobs: report the sampled token's log-probability and this many alternatives (0-20).
        echo: not supported (false only).
    """

    prompt: str
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: Literal[False] = False


class ChatMessage(_Body):
    """One message: ``role`` and ``content`` (a string, or a list of ``{"type": "text",
    "text": ...}`` parts, which are joined)."""

    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` body (OpenAI chat completions).

    Attributes:
        messages: the conversation, rendered with the model's chat template.
        max_tokens / max_completion_tokens: new tokens at most; None fills the context.
        logprobs: return per-token log-probabilities.
        top_logprobs: alternatives per token (0-20); needs ``logprobs``.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class GenerateRequest(_Body):
    """``POST /generate`` body, the shape of DeepSeek's FastAPI example.

    Attributes:
        prompt: text to continue.
        max_length: total tokens, prompt included (HF ``generate`` / ``generate_text`` semantics).
        max_new_tokens: if given, new tokens instead of ``max_length``.
        temperature, top_p, top_k, seed, stop: as in :class:`SamplingParams`.
    """

    prompt: str
    max_length: int = 200
    max_new_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None


_Sampling.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
