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
from deepwhale.serve.chat_features import ChatFeatures, SampleParser, merge_deltas
from deepwhale.serve.errors import APIError
from deepwhale.serve.schemas import ChatCompletionRequest, ChatMessage
from deepwhale.serve.serving import Serving
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
    features = ChatFeatures(body, tok, serving.reasoning, serving.chat_template)
    ids = await serving.encode_chat(request, *features.prompt_messages(messages))
    features.note_prompt(ids)
    max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    params = serving.sampling_params(body, serving.budget(ids, max_tokens, "max_tokens"))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    req = serving.submit(ids, params, body.n, logprobs)
    request.state.audit_request = req
    if body.stream:
        role = {"role": "assistant", "content": ""}
        parsers: list[SampleParser | None] = [None] * req.n
        return stream_response(
            serving.bridge,
            request,
            req,
            obj="chat.completion.chunk",
            model_name=serving.model_name,
            choice=_stream_choice(tok, body.logprobs, features, parsers),
            first_choices=[
                {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                for i in range(req.n)
            ],
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            logprobs=body.logprobs,
            usage_fn=lambda r: features.usage(r, parsers),
        )
    await serving.bridge.drain([req], request)
    choices, parsers = [], []
    for seq, text in zip(req.sequences, req.texts(), strict=True):
        parser = features.parser()
        parser.feed(text)
        parser.finish()
        features.check_called(parser, seq.finish_reason)
        parsers.append(parser)
        choices.append(
            {
                "index": seq.index,
                "message": parser.message(),
                "logprobs": chat_logprobs(tok, seq.logprobs) if body.logprobs else None,
                "finish_reason": features.finish_reason(parser, seq.finish_reason),
            }
        )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": serving.model_name,
        "choices": choices,
        "usage": features.usage(req, parsers),
    }


def check_chat_template(serving: Serving, param: str) -> None:
    """Raises APIError (400 ``no_chat_template``, ``param`` the messages' field) unless the
    served model's tokenizer has a chat template."""
    if serving.chat_template is None and not serving.model.tokenizer.chat_templates:
        raise APIError(
            f"the model '{serving.model_name}' has no chat template; use /v1/completions with "
            "a plain text prompt",
            param=param,
            code="no_chat_template",
        )


def _stream_choice(
    tok: Tokenizer, logprobs: bool, features: ChatFeatures, parsers: list[SampleParser | None]
) -> ChoiceFn:
    """A streamed chat choice: the delta of the sample's parser (``reasoning_content``,
    ``content``, ``tool_calls``; empty for a bare finish), and with ``logprobs`` that token's
    chat logprobs; None while the parsers hold everything back. ``parsers[i]`` is set to
    sample ``i``'s parser on its first chunk. Raises APIError (``tool_call_missing``) at the
    finish of a sample that did not make a required call."""

    def choice(i: int, chunk: GenerationChunk) -> dict | None:
        if parsers[i] is None:
            parsers[i] = features.parser()
        parser = parsers[i]
        delta = parser.feed(chunk.text) if chunk.text else {}
        if chunk.finish_reason is not None:
            delta = merge_deltas(delta, parser.finish())
            features.check_called(parser, chunk.finish_reason)
        lps = [chunk.logprobs] if logprobs and chunk.logprobs is not None else None
        if not delta and chunk.finish_reason is None and not lps:
            return None
        return {
            "index": i,
            "delta": delta,
            "logprobs": chat_logprobs(tok, lps) if lps else None,
            "finish_reason": features.finish_reason(parser, chunk.finish_reason),
        }

    return choice


def to_message(m: ChatMessage) -> dict:
    """A chat message as the template expects it; text parts of list content are joined, and a
    ``developer`` message (OpenAI's newer name for system instructions) becomes a ``system``
    one, as OpenAI treats it, so every chat template (none of which knows ``developer``) sees
    it. ``tool_calls`` (as plain dicts) and ``tool_call_id`` are passed on when set."""
    content = m.content
    if isinstance(content, list):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:  # only then: R1's template tests "'tool_calls' in message"
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
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
