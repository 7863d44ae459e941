"""Request-body pieces of OpenAI tool calling, as pydantic models (pydantic only, like
:mod:`deepwhale.serve.schemas`, which builds ``ChatCompletionRequest`` from them).

Shapes follow https://platform.openai.com/docs/api-reference/chat/create (``tools``,
``tool_choice``, ``parallel_tool_calls``) and the assistant message's ``tool_calls``. A malformed
tool, an unknown name in ``tool_choice`` or a ``tool_choice`` without ``tools`` is a 400 naming
the field, as OpenAI answers; nothing here constrains decoding (see
:mod:`deepwhale.serve.chat_features` for what the server does with them).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

#: OpenAI's rule for function names
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _fail(message: str) -> PydanticCustomError:
    """A validation error answered with ``message`` verbatim (the ``"deepwhale"`` error type
    of :mod:`deepwhale.serve.schemas`, kept here so that this module imports no other)."""
    return PydanticCustomError("deepwhale", message.replace("{", "(").replace("}", ")"))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    """``function`` of a tool call: its ``name`` and ``arguments`` (JSON text, as the model
    wrote it)."""

    name: StrictStr
    arguments: StrictStr


class ToolCall(_Body):
    """One entry of an assistant message's ``tool_calls``: ``{"id", "type": "function",
    "function": {"name", "arguments"}}``."""

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Body):
    """``function`` of a tool: ``name`` (1-64 of ``a-zA-Z0-9_-``, OpenAI's rule), an optional
    ``description``, and ``parameters``, a JSON Schema of the arguments object (its ``type``,
    if given, must be ``"object"``, ``properties`` an object, ``required`` a list of strings).
    ``strict`` is accepted; nothing constrains decoding here."""

    name: StrictStr
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not FUNCTION_NAME.fullmatch(v):
            raise _fail(f"function name must be 1-64 of a-z, A-Z, 0-9, _ and -, got {v!r}")
        return v

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if v.get("type", "object") != "object":
            raise _fail(f"parameters must be a JSON Schema of type 'object', got {v.get('type')!r}")
        if not isinstance(v.get("properties", {}), dict):
            raise _fail("parameters.properties must be an object")
        required = v.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _fail("parameters.required must be a list of strings")
        return v


class Tool(_Body):
    """One entry of ``tools``: ``{"type": "function", "function": FunctionDefinition}``."""

    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(_Body):
    """``function`` of a named ``tool_choice``: ``{"name"}``."""

    name: StrictStr


class NamedToolChoice(_Body):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name"}}``."""

    type: Literal["function"]
    function: ChosenFunction


class ToolFields(_Body):
    """The tool fields of a chat body (mixed into ``ChatCompletionRequest``).

    Attributes:
        tools: functions the model may call (:class:`Tool`; unique names).
        tool_choice: ``"none"``, ``"auto"`` (the default with tools), ``"required"`` or a
            :class:`NamedToolChoice` naming one of ``tools``; anything but ``"none"`` needs
            ``tools``.
        parallel_tool_calls: false keeps only the first call the model makes.
    """

    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise _fail("tools must have unique function names")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(
        cls, v: str | NamedToolChoice | None, info: ValidationInfo
    ) -> str | NamedToolChoice | None:
        if v is None or v == "none" or "tools" not in info.data:  # bad tools: reported
            return v
        tools = info.data["tools"] or []
        if not tools:
            raise _fail("tool_choice other than 'none' needs tools")
        if isinstance(v, NamedToolChoice):
            names = [t.function.name for t in tools]
            if v.function.name not in names:
                raise _fail(
                    f"tool_choice names the function {v.function.name!r}, which is not in "
                    f"tools ({', '.join(names)})"
                )
        return v

    def tool_mode(self) -> str:
        """``"none"`` (no tools, or ``tool_choice: "none"``), ``"auto"``, ``"required"`` or
        ``"named"``."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"
