"""Tool calls in DeepSeek-V3/R1 output, parsed back into OpenAI ``tool_calls``.

DeepSeek-V3 and R1 write function calls with their own special tokens (the markup their chat
templates render for an assistant turn's ``tool_calls``)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(DeepSeek-V3.1 drops the type and the code fence: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>
{"arg": 1}<｜tool▁call▁end｜>``; both are read.) Text before ``<｜tool▁calls▁begin｜>`` is the
message's ``content``. Each call becomes ``{"id": "call_...", "type": "function", "function":
{"name", "arguments"}}`` with ``arguments`` the JSON text as the model wrote it
(https://platform.openai.com/docs/api-reference/chat/object); vLLM's ``deepseek_v3`` tool
parser reads the same markup.

A call is kept only when its arguments are a JSON object and its name is one of the request's
tools (the one named by ``tool_choice``, if any); otherwise its raw text stays in ``content``,
so nothing the model wrote is lost. There is no guided decoding here: ``tool_choice:
"required"`` or a named function cannot force the model to call one (the serving layer
reports an error when it did not, :mod:`deepwhale.serve.serving_chat`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable

from deepwhale.inference.generate import stop_holdback

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

# V3 / R1: "function<sep>NAME\n```json\nARGS\n```"; V3.1: "NAME<sep>ARGS"
_V3_CALL = re.compile(
    rf"\s*(?P<type>\w+){re.escape(SEP)}(?P<name>[^\n]+?)\s*\n```(?:json)?\s*\n(?P<args>.*?)\s*```\s*",
    re.DOTALL,
)
_V31_CALL = re.compile(rf"\s*(?P<name>[A-Za-z0-9_.\-]+){re.escape(SEP)}(?P<args>.*?)\s*", re.DOTALL)


def new_call_id() -> str:
    """A fresh tool call id, ``call_`` and 24 hex digits (OpenAI's shape)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str, names: Iterable[str] | None = None) -> dict | None:
    """One call's text (between ``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``) as an
    OpenAI tool call with a new id, or None when it is not a valid call: no known form, an
    ``arguments`` that is not a JSON object, or a name outside ``names`` (None: any name)."""
    match = _V3_CALL.fullmatch(body) or _V31_CALL.fullmatch(body)
    if match is None:
        return None
    if "type" in match.groupdict() and match["type"] != "function":
        return None
    name, args = match["name"].strip(), match["args"].strip()
    if names is not None and name not in set(names):
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


class ToolCallParser:
    """Splits one sample's content into text and tool calls, delta by delta.

    Args:
        names: the function names a call may use (None: any).
        max_calls: keep at most this many calls (1 for ``parallel_tool_calls: false``); later
            ones are dropped. None: no limit.

    Content before ``<｜tool▁calls▁begin｜>`` is passed on at once, except a tail that could
    still become that marker. Inside the block, each call is reported whole once its
    ``<｜tool▁call▁end｜>`` arrives (one ``delta.tool_calls`` entry with name and arguments,
    which OpenAI's and LangChain's stream readers accept). Text after ``<｜tool▁calls▁end｜>``
    is content again, as written. :attr:`calls` holds every call reported.
    """

    def __init__(self, names: Iterable[str] | None = None, max_calls: int | None = None) -> None:
        self.names = None if names is None else frozenset(names)
        self.max_calls = max_calls
        self.calls: list[dict] = []
        self._in_block = False
        # the block's opening marker: "owed" (not accounted for yet), "raw" (given out as
        # content with an invalid call) or "used" (a valid call consumed it)
        self._marker = "used"
        self._held = ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """Add a content delta; returns ``(content delta, new tool calls)``."""
        self._held += text
        content, calls = "", []
        while True:
            if not self._in_block:
                start = self._held.find(CALLS_BEGIN)
                if start < 0:
                    keep = stop_holdback(self._held, [CALLS_BEGIN])
                    cut = len(self._held) - keep
                    content, self._held = content + self._held[:cut], self._held[cut:]
                    return content, calls
                content += self._held[:start]
                self._held, self._in_block = self._held[start + len(CALLS_BEGIN) :], True
                self._marker = "owed"
            text_out, new, done = self._block_step()
            content, calls = content + text_out, calls + new
            if not done:
                return content, calls

    def finish(self) -> tuple[str, list[dict]]:
        """The sample has ended: held-back text (an unfinished call stays raw) as content."""
        held, self._held = self._held, ""
        if self._in_block:
            return (self._owed() + held if held.strip() else ""), []
        return held, []

    def _owed(self) -> str:
        """The block's opening marker, the first time raw block text becomes content."""
        if self._marker != "owed":
            return ""
        self._marker = "raw"
        return CALLS_BEGIN

    def _block_step(self) -> tuple[str, list[dict], bool]:
        """Consume complete calls inside the block; ``done`` once ``<｜tool▁calls▁end｜>`` (or a
        stray text) ends the block, so the caller goes on with content."""
        content, calls = "", []
        while True:
            held = self._held.lstrip()
            if held.startswith(CALLS_END):
                # text after the block is content as written (stripping it would depend
                # on how the text was cut into deltas)
                self._held, self._in_block = held[len(CALLS_END) :], False
                return content + (CALLS_END if self._marker == "raw" else ""), calls, True
            if held.startswith(CALL_BEGIN):
                end = held.find(CALL_END)
                if end < 0:
                    return content, calls, False
                body = held[len(CALL_BEGIN) : end]
                self._held = held[end + len(CALL_END) :]
                call = parse_call(body, self.names)
                if call is None:
                    content += self._owed() + CALL_BEGIN + body + CALL_END
                    continue
                if self._marker == "owed":
                    self._marker = "used"
                if self.max_calls is None or len(self.calls) < self.max_calls:
                    self.calls.append(call)
                    calls.append({"index": len(self.calls) - 1, **call})
                continue
            if not held or CALL_BEGIN.startswith(held) or CALLS_END.startswith(held):
                return content, calls, False  # undecided: wait for more text
            # neither a call nor the block's end: the block is over, the rest is content
            self._in_block = False
            content += self._owed()
            return content, calls, True


def tools_system_prompt(tools: list[dict] | None, must_call: str | None = None) -> str:
    """The system text that describes ``tools`` and this markup to a model whose chat template
    ignores ``tools`` (DeepSeek-V3's and R1's own templates render tool calls and tool outputs
    in the history, but not the definitions; DeepSeek's API adds them on its side).

    Args:
        tools: OpenAI tool objects (``{"type": "function", "function": {...}}``), written out as
            JSON; None or empty: only the ``must_call`` line.
        must_call: None (the model may answer in text), ``"required"`` (call at least one) or a
            function name (call that one).

    Returns:
        Plain text for a system message; the markup it shows is what :class:`ToolCallParser`
        reads.
    """
    lines = []
    if tools:
        example = (
            f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}FUNCTION_NAME\n```json\n"
            f'{{"argument": "value"}}\n```{CALL_END}{CALLS_END}'
        )
        lines += [
            "You can call the functions below. To call one, answer with this markup, one "
            f"{CALL_BEGIN}...{CALL_END} per call, the arguments as one JSON object:",
            example,
            "Functions:",
            *(json.dumps(t, ensure_ascii=False) for t in tools),
        ]
    if must_call == "required":
        lines.append("You must call at least one of these functions now.")
    elif must_call is not None:
        lines.append(f"You must call the function {must_call} now.")
    return "\n".join(lines)
