"""Request-body fields of structured output, as pydantic models (pydantic only, like
:mod:`deepwhale.serve.schemas`, which mixes :class:`GuidedFields` into the completions and chat
bodies).

Two spellings are accepted, as vLLM accepts them:

- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (https://platform.openai.com/docs/guides/structured-outputs), which is what
  ``openai``'s ``chat.completions.parse`` and LangChain's ``with_structured_output`` send;
- vLLM's extensions (https://docs.vllm.ai/en/latest/features/structured_outputs.html):
  ``guided_json`` (a schema, as an object or as JSON text), ``guided_regex``, ``guided_choice``
  and ``guided_grammar`` (a Lark grammar), sent through the ``openai`` client's ``extra_body``.

At most one constraint per request: two of them are a 400 naming both fields. The schema, regex or
grammar itself is checked when the request reaches the engine
(:class:`deepwhale.inference.guided.GuidedDecoding`), also a 400. :meth:`GuidedFields.guided_spec`
returns the one constraint as plain keyword arguments of ``GuidedDecoding``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from pydantic_core import PydanticCustomError


def _fail(message: str) -> PydanticCustomError:
    """A validation error answered with ``message`` verbatim (the ``"deepwhale"`` error type
    of :mod:`deepwhale.serve.schemas`, kept here so that this module imports no other)."""
    return PydanticCustomError("deepwhale", message.replace("{", "(").replace("}", ")"))


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JSONSchemaFormat(_Body):
    """``response_format.json_schema``: ``name`` (1-64 of ``a-zA-Z0-9_-``, as OpenAI requires),
    ``schema`` (the JSON Schema the output validates against; absent: any JSON value),
    ``strict`` and ``description`` (accepted; decoding is always strict here)."""

    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    json_schema: dict | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema`` (which needs
    ``json_schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _fail("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class GuidedFields(_Body):
    """Structured-output fields of a request body (see the module docstring).

    Attributes:
        response_format: OpenAI's ``response_format`` (:class:`ResponseFormat`).
        guided_json: a JSON Schema, as an object or as JSON text.
        guided_regex: the output fully matches this regular expression.
        guided_choice: the output is exactly one of these strings.
        guided_grammar: a Lark grammar the output matches.
        guided_decoding_backend: accepted when ``"llguidance"`` or ``"auto"`` (the only backend).
    """

    response_format: ResponseFormat | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_decoding_backend: StrictStr | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> GuidedFields:
        given = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise _fail(f"at most one structured-output constraint per request, got {given}")
        if isinstance(self.guided_json, str):
            try:
                schema = json.loads(self.guided_json)
            except json.JSONDecodeError as e:
                raise _fail(f"guided_json is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                raise _fail("guided_json must be a JSON Schema object")
            self.guided_json = schema
        backend = self.guided_decoding_backend
        if backend is not None and backend.split(":")[0] not in ("llguidance", "auto"):
            raise _fail(
                f"guided_decoding_backend {backend!r} is not available; this server uses llguidance"
            )
        return self

    def guided_spec(self) -> dict[str, Any] | None:
        """The request's one constraint as keyword arguments of
        :class:`deepwhale.inference.guided.GuidedDecoding` (``{"json": schema}``,
        ``{"json_object": True}``, ``{"regex": ...}``, ``{"choice": [...]}`` or
        ``{"grammar": ...}``), or None when the output is unconstrained."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return {"json_object": True}
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.json_schema
            return {"json": schema if schema is not None else {}}
        if self.guided_json is not None:
            return {"json": self.guided_json}
        if self.guided_regex is not None:
            return {"regex": self.guided_regex}
        if self.guided_choice is not None:
            return {"choice": list(self.guided_choice)}
        if self.guided_grammar is not None:
            return {"grammar": self.guided_grammar}
        return None


def text_format_spec(fmt: Any) -> dict[str, Any] | None:
    """The constraint of the Responses API's ``text.format`` (``{"type": "text"}``,
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "name", "schema", "strict"}``, the
    schema fields flat, as https://platform.openai.com/docs/api-reference/responses/create
    has them) as keyword arguments of ``GuidedDecoding``, or None for text / no format.

    Raises:
        PydanticCustomError: a format that is not one of these shapes.
    """
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _fail("text.format must have type 'text', 'json_object' or 'json_schema'")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"json_object": True}
    schema = fmt.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise _fail("text.format.schema must be a JSON Schema object")
    return {"json": schema if schema is not None else {}}
