"""``POST /v1/chat/completions``: OpenAI chat completions through the model's chat template.

The messages are rendered by :meth:`deepwhale.api.DeepSeekModel.encode_prompt` (the tokenizer's
chat template with the generation prompt; ``developer`` messages are given the ``system`` role
first, :func:`to_message`), then the path is that of every endpoint (see
:mod:`deepwhale.serve.serving`). Chat ``logprobs`` follow
https://platform.openai.com/docs/api-reference/chat/object (``content[].{token, logprob, bytes,
top_logprobs}``).
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request

from deepwhale.inference.generate import GenerationChunk, TokenLogprob
from deepwhale.serve.errors import APIError
from deepwhale.serve.schemas import ChatCompletionRequest, ChatMessage
from deepwhale.serve.serving import Serving, usage
from deepwhale.serve.sse import ChoiceFn, stream_response
from deepwhale.tokenizer import Tokenizer


async def create_chat_completion(serving: Serving, body: ChatCompletionRequest, request: Request):
    """Answer one chat body: a ``chat.completion`` object, or an SSE stream of
    ``chat.completion.chunk`` objects (each sample's first chunk carries the role).

    Raises:
        APIError: no chat template (``no_chat_template``), ``top_logprobs`` without
            ``logprobs``, a budget that does not fit, or the client leaving.
        ValueError: sampling values out of range (400).
    """
    messages = [to_message(m) for m in body.messages]
    serving.authorize(request, body.model, messages)
    serving.check_model(body.model)
    check_chat_template(serving, "messages")
    tok = serving.model.tokenizer
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    ids = await serving.encode(request, messages)
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    params = serving.sampling_params(body, serving.budget(ids, max_tokens, "max_tokens"))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    req = serving.submit(ids, params, body.n, logprobs)
    request.state.audit_request = req
    if body.stream:
        role = {"role": "assistant", "content": ""}
        return stream_response(
            serving.bridge,
            request,
            req,
            obj="chat.completion.chunk",
            model_name=serving.model_name,
            choice=_stream_choice(tok, body.logprobs),
            first_choices=[
                {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                for i in range(req.n)
            ],
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            logprobs=body.logprobs,
        )
    await serving.bridge.drain([req], request)
    choices = [
        {
            "index": seq.index,
            "message": {"role": "assistant", "content": text},
            "logprobs": chat_logprobs(tok, seq.logprobs) if body.logprobs else None,
            "finish_reason": seq.finish_reason,
        }
        for seq, text in zip(req.sequences, req.texts(), strict=True)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": serving.model_name,
        "choices": choices,
        "usage": usage(req),
    }


def check_chat_template(serving: Serving, param: str) -> None:
    """Raises APIError (400 ``no_chat_template``, ``param`` the messages' field) unless the
    served model's tokenizer has a chat template."""
    if not serving.model.tokenizer.chat_templates:
        raise APIError(
            f"the model '{serving.model_name}' has no chat template; use /v1/completions with "
            "a plain text prompt",
            param=param,
            code="no_chat_template",
        )


def _stream_choice(tok: Tokenizer, logprobs: bool) -> ChoiceFn:
    """A streamed chat choice: ``delta.content`` (empty delta for a bare finish), and with
    ``logprobs`` that token's chat logprobs."""

    def choice(i: int, chunk: GenerationChunk) -> dict:
        lps = [chunk.logprobs] if logprobs and chunk.logprobs is not None else None
        return {
            "index": i,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": chat_logprobs(tok, lps) if lps else None,
            "finish_reason": chunk.finish_reason,
        }

    return choice


def to_message(m: ChatMessage) -> dict:
    """A chat message as the template expects it; text parts of list content are joined, and a
    ``developer`` message (OpenAI's newer name for system instructions) becomes a ``system``
    one, as OpenAI treats it, so every chat template (none of which knows ``developer``) sees
    it."""
    content = m.content
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    return out


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> dict:
    """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``;
    ``bytes`` are the token's own UTF-8 bytes (one byte for a ``<0xNN>`` token)."""

    def entry(token_id: int, logprob: float) -> dict:
        return {
            "token": tok.token_text(token_id),
            "logprob": logprob,
            "bytes": list(tok.token_bytes(token_id)),
        }

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps
        ]
    }
