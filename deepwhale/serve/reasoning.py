"""Reasoning content of DeepSeek-R1-style output: the text inside ``<think>...</think>``.

DeepSeek's own API answers R1 (``deepseek-reasoner``) with ``message.reasoning_content`` (the
chain of thought, without the tags) beside ``message.content`` (the answer), and streams them
as ``delta.reasoning_content`` and ``delta.content``
(https://api-docs.deepseek.com/guides/reasoning_model); vLLM's ``--reasoning-parser
deepseek_r1`` does the same. R1 writes ``<think>\\n...</think>\\n\\n`` before its answer; newer
R1 chat templates put ``<think>\\n`` at the end of the generation prompt themselves, so the
output then holds only the reasoning, ``</think>`` and the answer.

:class:`ReasoningParser` splits text deltas as they arrive (one parser per sample). Markers may
come split over several deltas (they are single tokens in the R1 vocabulary, but deltas are
text and a model can spell a marker from smaller pieces), so a possible partial marker is held
back until it is decided, as stop strings are in :class:`~deepwhale.inference.generate.TextStream`.
"""

from __future__ import annotations

from collections.abc import Sequence

from deepwhale.inference.generate import stop_holdback

THINK_START = "<think>"
THINK_END = "</think>"
#: ``--reasoning-parser`` choices (``deepseek_r1`` and ``none`` are vLLM's names)
REASONING_PARSERS = ("auto", "deepseek_r1", "none")


def is_reasoning_template(template: str | None) -> bool:
    """Whether a chat template source is R1-style: it mentions ``<think>`` or ``</think>``
    (DeepSeek-R1's template drops the reasoning of earlier turns at ``</think>``; newer ones
    end the generation prompt with ``<think>\\n``). DeepSeek-V3's template mentions neither."""
    return bool(template) and (THINK_START in template or THINK_END in template)


def resolve_reasoning_parser(name: str, tokenizer, chat_template: str | None = None) -> bool:
    """Whether chat answers are split into ``reasoning_content`` and ``content``.

    Args:
        name: ``"deepseek_r1"`` (always), ``"none"`` (never: ``<think>`` stays in
            ``content``) or ``"auto"``: when the chat template (``chat_template``, else the
            tokenizer's templates) is R1-style (:func:`is_reasoning_template`), or the
            vocabulary holds both ``<think>`` and ``</think>`` as tokens (DeepSeek-V3's does
            too; harmless there: an answer is reasoning only if the prompt or the answer
            opens ``<think>``).
        tokenizer: a :class:`~deepwhale.tokenizer.Tokenizer` (``chat_templates``,
            ``token_to_id``), or None.
        chat_template: the server's chat template override, or None.

    Raises:
        ValueError: ``name`` not in :data:`REASONING_PARSERS`.
    """
    if name not in REASONING_PARSERS:
        raise ValueError(
            f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}"
        )
    if name != "auto":
        return name == "deepseek_r1"
    if tokenizer is None:
        return False
    templates = [chat_template] if chat_template else list(tokenizer.chat_templates.values())
    if any(is_reasoning_template(t) for t in templates):
        return True
    return all(tokenizer.token_to_id(t) is not None for t in (THINK_START, THINK_END))


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether a rendered prompt's end (the text of its last few tokens) leaves the model
    inside a ``<think>`` block: it ends with ``<think>`` and optional whitespace."""
    return prompt_tail.rstrip().endswith(THINK_START)


class ReasoningParser:
    """Splits one sample's generated text into reasoning and content, delta by delta.

    Args:
        in_reasoning: the prompt already opened ``<think>`` (see :func:`prompt_opens_reasoning`);
            otherwise the output is reasoning only if it starts with ``<think>`` (leading
            whitespace allowed), and plain content if it starts with anything else.

    The tags are not part of either text; one newline right after ``<think>`` and the
    whitespace right after ``</think>`` are dropped (R1 writes ``<think>\\n`` and
    ``</think>\\n\\n``). Output cut off inside the reasoning (``finish_reason: "length"``) is
    all reasoning. Feeding a text in any number of pieces gives the same joined result.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        # "start": maybe a <think> is coming; "think": inside it; "after": right after
        # </think> (whitespace is dropped); "content": the answer
        self._state = "think" if in_reasoning else "start"
        self._skip_newline = False
        self._held = ""
        self.reasoning_text = ""  # every reasoning delta so far, joined
        self.saw_reasoning = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """Add a text delta; returns ``(reasoning delta, content delta)`` (either may be ``""``
        while a marker could still be forming)."""
        self._held += text
        reasoning, content = "", ""
        while self._held:
            before = self._state
            r, c = self._step()
            reasoning, content = reasoning + r, content + c
            if self._state == before:  # waiting for more text
                break
        self.reasoning_text += reasoning
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The sample has ended: everything held back, as ``(reasoning, content)``."""
        held, self._held = self._held, ""
        if self._state == "think":
            self.reasoning_text += held
            return held, ""
        return "", held if self._state in ("start", "content") else ""

    def _step(self) -> tuple[str, str]:
        """Consume what the current state can decide; changes the state when a marker (or its
        absence) is settled."""
        held = self._held
        if self._state == "start":
            stripped = held.lstrip()
            if stripped.startswith(THINK_START):
                self._held = stripped[len(THINK_START) :]
                self._state, self._skip_newline, self.saw_reasoning = "think", True, True
                return "", ""
            if not stripped or THINK_START.startswith(stripped):
                return "", ""  # undecided
            self._state, self._held = "content", ""
            return "", held
        if self._state == "think":
            if self._skip_newline:
                if held.startswith("\n"):
                    held = held[1:]
                self._skip_newline = False
            end = held.find(THINK_END)
            if end >= 0:
                self._state, self._held = "after", held[end + len(THINK_END) :]
                return held[:end], ""
            keep = stop_holdback(held, [THINK_END])
            self._held = held[len(held) - keep :]
            return held[: len(held) - keep], ""
        if self._state == "after":
            self._held = held.lstrip()
            if self._held:
                self._state = "content"
            return "", ""
        self._held = ""
        return "", held


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """A whole output as ``(reasoning_content, content)``; ``reasoning_content`` is None when
    the output has no reasoning (see :class:`ReasoningParser` for the rules)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2


def reasoning_token_count(
    output_ids: Sequence[int], end_id: int | None, saw_reasoning: bool
) -> int:
    """Generated tokens spent on reasoning (``completion_tokens_details.reasoning_tokens``): up
    to and including the first ``</think>`` token (id ``end_id``), all of them when the
    reasoning never ended, 0 when the sample had no reasoning (``saw_reasoning`` false, see
    :attr:`ReasoningParser.saw_reasoning`)."""
    if not saw_reasoning:
        return 0
    if end_id is not None and end_id in output_ids:
        return list(output_ids).index(end_id) + 1
    return len(output_ids)
