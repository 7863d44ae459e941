"""``POST /v1/responses``: the OpenAI Responses API, stateless subset (as vLLM serves it).

``instructions`` and the ``input`` messages become chat messages (``instructions`` a leading
``system`` message, ``developer`` the ``system`` role, text parts joined,
:func:`~deepwhale.serve.serving_chat.to_message`), rendered with the model's chat template like
``/v1/chat/completions``; then the path is that of every endpoint (see
:mod:`deepwhale.serve.serving`). The answer is one ``response`` object
(https://platform.openai.com/docs/api-reference/responses/object) whose ``output`` is one
assistant ``message`` with one ``output_text`` part, or with ``stream`` the typed SSE events of
https://platform.openai.com/docs/api-reference/responses-streaming. Nothing is stored:
``store`` is answered ``false`` and ``previous_response_id`` is refused (see
:class:`~deepwhale.serve.schemas.ResponseRequest`).
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request

from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.serve.schemas import ChatMessage, ResponseRequest
from deepwhale.serve.serving import Serving, usage
from deepwhale.serve.serving_chat import check_chat_template, to_message
from deepwhale.serve.sse import stream_typed_events


async def create_response(serving: Serving, body: ResponseRequest, request: Request):
    """Answer one Responses body: a ``response`` object (``status`` ``completed``, or
    ``incomplete`` with ``incomplete_details.reason`` ``max_output_tokens`` when the token
    budget stopped it), or an SSE stream of its events.

    Raises:
        APIError: no chat template (``no_chat_template``, param ``input``), a budget that does
            not fit, or the client leaving.
        ValueError: sampling values out of range (400).
    """
    messages = input_messages(body)
    serving.authorize(request, body.model, messages)
    serving.check_model(body.model)
    check_chat_template(serving, "input")
    ids = await serving.encode_chat(request, messages)
    params = serving.sampling_params(
        body, serving.budget(ids, body.max_output_tokens, "max_output_tokens")
    )
    req = serving.submit(ids, params)
    request.state.audit_request = req
    shape = _ResponseShape(serving.model_name, body)
    if body.stream:
        return _stream(serving, request, req, shape)
    await serving.bridge.drain([req], request)
    return shape.final(req)


def input_messages(body: ResponseRequest) -> list[dict]:
    """The chat messages of a Responses body: ``instructions`` as a leading system message,
    then the ``input`` items (as :func:`to_message` gives them to the chat template)."""
    messages = (
        [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    )
    for item in body.input:
        messages.append(to_message(ChatMessage(role=item.role, content=item.text())))
    return messages


def response_usage(req: EngineRequest) -> dict:
    """The Responses API ``usage``: input, output and total tokens (nothing is cached and
    there are no reasoning tokens)."""
    u = usage(req)
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }


class _ResponseShape:
    """The objects of one response: its ``response`` object in each state, its message item
    and its text part (ids and ``created_at`` fixed once, so the stream and the final object
    agree)."""

    def __init__(self, model_name: str, body: ResponseRequest) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model_name = model_name
        self.body = body

    def response(self, status: str, output: list[dict], req: EngineRequest | None = None) -> dict:
        """The ``response`` object with ``status`` and ``output``; ``usage`` from ``req`` (None
        while in progress). The request's settings are echoed as OpenAI does."""
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": self.model_name,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": [],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": None if req is None else response_usage(req),
            "user": body.user,
        }

    def message(self, status: str, parts: list[dict]) -> dict:
        """The assistant ``message`` output item."""
        return {
            "type": "message",
            "id": self.message_id,
            "role": "assistant",
            "status": status,
            "content": parts,
        }

    @staticmethod
    def text_part(text: str) -> dict:
        """An ``output_text`` content part."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def final(self, req: EngineRequest) -> dict:
        """The finished ``response`` object of a finished engine request."""
        status = "incomplete" if req.sequences[0].finish_reason == "length" else "completed"
        message = self.message(status, [self.text_part(req.texts()[0])])
        return self.response(status, [message], req)


def _stream(serving: Serving, request: Request, req: EngineRequest, shape: _ResponseShape):
    """The SSE events of one response, in the Responses API's order: created, in_progress,
    output_item.added, content_part.added, one output_text.delta per piece of text, then
    output_text.done, content_part.done, output_item.done and completed (or incomplete)."""
    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    in_progress = shape.response("in_progress", [])
    head = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": shape.message("in_progress", []),
        },
        {"type": "response.content_part.added", **where, "part": shape.text_part("")},
    ]

    def delta(text: str) -> list[dict]:
        return [{"type": "response.output_text.delta", **where, "delta": text, "logprobs": []}]

    def tail() -> list[dict]:
        final = shape.final(req)
        item = final["output"][0]
        part = item["content"][0]
        done = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [
            {"type": "response.output_text.done", **where, "text": part["text"], "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": done, "response": final},
        ]

    return stream_typed_events(serving.bridge, request, req, head=head, delta=delta, tail=tail)
