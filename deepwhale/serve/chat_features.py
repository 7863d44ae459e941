"""Reasoning and tool calls of one chat request: how its prompt is rendered, and how each
sample's text becomes ``reasoning_content``, ``content`` and ``tool_calls``.

Prompt (:meth:`ChatFeatures.render`): with ``tools`` (and ``tool_choice`` other than
``"none"``), a chat template that reads ``tools`` gets them (only the named one for a named
``tool_choice``); one that ignores them (DeepSeek-V3's and R1's own) gets a system message
describing them and the DeepSeek tool-call markup instead
(:func:`~deepwhale.serve.tool_calls.tools_system_prompt`). ``required`` or a named function adds
a line telling the model it must call. With ``tool_choice: "none"`` the tools are not shown and
nothing is parsed.

Output (:class:`SampleParser`): the text goes through
:class:`~deepwhale.serve.reasoning.ReasoningParser` (when the server's reasoning parser is on),
then its content through :class:`~deepwhale.serve.tool_calls.ToolCallParser` (when tools are
active), so a call written inside ``<think>`` is reasoning, not a call. Streaming and
non-streaming answers go through the same parsers, so the joined stream equals the message.

Enforcement: nothing constrains decoding. When ``tool_choice`` is ``"required"`` or names a
function and the model answered without a valid call, the request fails with 422
``tool_call_missing`` (non-streaming) or ends with that error event (streaming) rather than
answering as if it had called one (:meth:`ChatFeatures.check_called`).
"""

from __future__ import annotations

from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.serve.errors import APIError
from deepwhale.serve.reasoning import (
    THINK_END,
    ReasoningParser,
    prompt_opens_reasoning,
    reasoning_token_count,
)
from deepwhale.serve.schemas import ChatCompletionRequest
from deepwhale.serve.serving import usage
from deepwhale.serve.tool_calls import ToolCallParser, tools_system_prompt
from deepwhale.tokenizer import Tokenizer

#: characters of the model's answer quoted in a ``tool_call_missing`` error
QUOTE_CHARS = 200


class ChatFeatures:
    """The reasoning and tool settings of one chat request.

    Args:
        body: the validated request body.
        tok: the served model's tokenizer.
        reasoning: the server's reasoning parser is on (:attr:`Serving.reasoning`); off for a
            request with structured output (its whole output is the constrained content).
        chat_template: the server's chat template override, or None.

    Attributes:
        mode: ``"none"``, ``"auto"``, ``"required"`` or ``"named"`` (see
            :meth:`~deepwhale.serve.schemas_tools.ToolFields.tool_mode`).
        tools: the tool objects shown to the model (plain dicts), or None.
        names: the function names a parsed call may use, or None when nothing is parsed.
        in_reasoning: the rendered prompt ends inside ``<think>`` (set by :meth:`render`).
    """

    def __init__(
        self,
        body: ChatCompletionRequest,
        tok: Tokenizer,
        reasoning: bool,
        chat_template: str | None = None,
    ) -> None:
        # a structured-output grammar constrains the output from its first token: no
        # reasoning block, the constrained text is the content
        guided = body.guided_spec() is not None
        self.tok, self.reasoning = tok, reasoning and not guided
        self.chat_template = chat_template
        self.mode = body.tool_mode()
        self.must_call = None
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        if self.mode == "named":
            self.must_call = body.tool_choice.function.name
            tools = [t for t in tools if t["function"]["name"] == self.must_call]
        elif self.mode == "required":
            self.must_call = "required"
        self.tools = tools if self.mode != "none" else None
        self.names = None if self.tools is None else [t["function"]["name"] for t in self.tools]
        self.max_calls = 1 if body.parallel_tool_calls is False else None
        self.in_reasoning = False

    def prompt_messages(self, messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
        """``(messages, tools)`` to render: the template's own ``tools`` when it reads them,
        else a leading system message describing them (merged into a first system message);
        plus the must-call line for ``required`` / a named function.

        Raises:
            TokenizerError: the chat template has a syntax error (a 400).
        """
        if self.tools is None:
            return messages, None
        native = "tools" in self.tok.chat_template_variables(self.chat_template, self.tools)
        text = tools_system_prompt(None if native else self.tools, self.must_call)
        if not text:
            return messages, self.tools
        if (
            messages
            and messages[0]["role"] == "system"
            and isinstance(messages[0].get("content"), str)
        ):
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
            messages = [first, *messages[1:]]
        else:
            messages = [{"role": "system", "content": text}, *messages]
        return messages, self.tools if native else None

    def note_prompt(self, prompt_ids: list[int]) -> None:
        """Record whether the rendered prompt (its last tokens) leaves the model inside
        ``<think>`` (R1 templates that open it in the generation prompt)."""
        tail = self.tok.decode(prompt_ids[-4:]) if prompt_ids else ""
        self.in_reasoning = self.reasoning and prompt_opens_reasoning(tail)

    def parser(self) -> SampleParser:
        """A fresh parser for one sample."""
        return SampleParser(self)

    def finish_reason(self, parser: SampleParser, reason: str | None) -> str | None:
        """OpenAI's ``finish_reason``: ``"tool_calls"`` when the sample stopped after making
        calls, else the engine's reason."""
        return "tool_calls" if parser.calls and reason == "stop" else reason

    def check_called(self, parser: SampleParser, reason: str | None) -> None:
        """Raises APIError (422 ``tool_call_missing``, param ``tool_choice``) when
        ``tool_choice`` required a call (``"required"`` or a named function) and the finished
        sample has none; the message quotes the start of what the model wrote."""
        if self.must_call is None or parser.calls:
            return
        wanted = "a tool call" if self.must_call == "required" else f"a call of {self.must_call}"
        said = parser.content_text[:QUOTE_CHARS]
        raise APIError(
            f"tool_choice asked for {wanted}, but the model answered without one "
            f"(finish_reason {reason!r}; this server does not constrain decoding to tool "
            f"calls). The answer began: {said!r}",
            status=422,
            type="tool_call_error",
            param="tool_choice",
            code="tool_call_missing",
        )

    def reasoning_tokens(self, parser: SampleParser, output_ids: list[int]) -> int:
        """Generated tokens spent on reasoning (see
        :func:`~deepwhale.serve.reasoning.reasoning_token_count`)."""
        end = self.tok.token_to_id(THINK_END)
        return reasoning_token_count(output_ids, end, parser.saw_reasoning)

    def usage(self, req: EngineRequest, parsers: list[SampleParser | None]) -> dict:
        """OpenAI ``usage`` of the finished request; with the reasoning parser on, plus
        ``completion_tokens_details.reasoning_tokens`` over its samples (``parsers[i]``
        parsed sample ``i``; None: a sample never streamed, counted as no reasoning)."""
        out = usage(req)
        if self.reasoning:
            n = sum(
                self.reasoning_tokens(p, seq.output_ids)
                for seq, p in zip(req.sequences, parsers, strict=True)
                if p is not None
            )
            out["completion_tokens_details"] = {"reasoning_tokens": n}
        return out


def merge_deltas(a: dict, b: dict) -> dict:
    """Two consecutive chat deltas of one sample as one (texts joined, tool calls listed)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


class SampleParser:
    """One sample's text, delta by delta, as an OpenAI chat delta: ``reasoning_content``,
    ``content`` and ``tool_calls`` (each key only when it has something).

    Args:
        features: the request's :class:`ChatFeatures`.
    """

    def __init__(self, features: ChatFeatures) -> None:
        self.features = features
        self._reasoning = ReasoningParser(features.in_reasoning) if features.reasoning else None
        self._tools = (
            None
            if features.names is None
            else ToolCallParser(features.names, max_calls=features.max_calls)
        )
        self.content_text = ""
        self.reasoning_text = ""

    @property
    def calls(self) -> list[dict]:
        """Every tool call parsed so far (OpenAI's shape, without ``index``)."""
        return [] if self._tools is None else self._tools.calls

    @property
    def saw_reasoning(self) -> bool:
        """Whether the sample had a reasoning block."""
        return self._reasoning is not None and self._reasoning.saw_reasoning

    def feed(self, text: str) -> dict:
        """The delta of a new piece of text (``{}`` while everything is held back)."""
        r, c = self._reasoning.feed(text) if self._reasoning else ("", text)
        return self._delta(r, *self._content(c, last=False))

    def finish(self) -> dict:
        """The delta of everything held back, once the sample has ended."""
        r, c = self._reasoning.finish() if self._reasoning else ("", "")
        content, calls = self._content(c, last=True)
        return self._delta(r, content, calls)

    def _content(self, text: str, last: bool) -> tuple[str, list[dict]]:
        if self._tools is None:
            return text, []
        content, calls = self._tools.feed(text) if text else ("", [])
        if last:
            c2, calls2 = self._tools.finish()
            content, calls = content + c2, calls + calls2
        return content, calls

    def _delta(self, reasoning: str, content: str, calls: list[dict]) -> dict:
        self.reasoning_text += reasoning
        self.content_text += content
        out: dict = {}
        if reasoning:
            out["reasoning_content"] = reasoning
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def message(self) -> dict:
        """The finished sample as an assistant message: ``content`` (None when only tool
        calls were made and no text besides whitespace), ``reasoning_content`` when the
        server's reasoning parser is on (None when the sample had no reasoning), and
        ``tool_calls`` when there are any."""
        content: str | None = self.content_text
        if self.calls and not content.strip():
            content = None
        out: dict = {"role": "assistant", "content": content}
        if self._reasoning is not None:
            out["reasoning_content"] = self.reasoning_text if self.saw_reasoning else None
        if self.calls:
            out["tool_calls"] = [dict(c) for c in self.calls]
        return out
