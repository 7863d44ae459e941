"""Errors in OpenAI's shape, and the exception handlers that answer them.

Every error the server sends is ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI
API reference's error object, https://platform.openai.com/docs/guides/error-codes). User errors
are 4xx: validation errors, malformed JSON, prompts that do not fit, unknown model names and
invalid sampling values (``ValueError`` from :class:`~deepwhale.inference.sampling.SamplingParams`
or the engine). An exception escaping a route becomes a 500 in :mod:`deepwhale.serve.middleware`.

Imports only the inference layer's error types and the schemas; routes and the serving layer
raise :class:`APIError`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepwhale.inference.generate import PromptTooLongError
from deepwhale.serve.schemas import InvalidUnicodeError

_NOT_AN_OBJECT = "the request body must be a JSON object sent with Content-Type: application/json"


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``
    (OpenAI's error object)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _is_type_tag(part) -> bool:
    """Whether a pydantic error location part names a union member, not a field."""
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")
    )


async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code)


async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
    """The first pydantic error as one line, ``param`` its field path (``body`` dropped)."""
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
    # drop "body" and the union-member tags pydantic puts in locations ("str", "list[...]")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    if param is None and first.get("type") in ("missing", "model_attributes_type"):
        return error_response(400, _NOT_AN_OBJECT)  # empty, form-encoded, array, ...
    if first.get("type") == "deepwhale":  # our own checks (schemas._fail): said in full
        return error_response(400, first["msg"], param=param)
    where = f"'{param}': " if param else ""
    return error_response(400, f"invalid {where}{first.get('msg', 'invalid request')}", param=param)


async def _unicode(_: Request, e: InvalidUnicodeError) -> JSONResponse:
    return error_response(400, str(e), param=e.param)


async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, str(e.detail), kind)


async def _too_long(_: Request, e: PromptTooLongError) -> JSONResponse:
    return error_response(400, str(e), param="prompt", code="context_length_exceeded")


async def _value(_: Request, e: ValueError) -> JSONResponse:
    # SamplingParams, TokenizerError, engine.add_request
    return error_response(400, str(e))


def install_error_handlers(app: FastAPI) -> None:
    """Map exceptions to OpenAI-shaped 4xx responses on ``app`` (anything else is a 500 from
    :class:`~deepwhale.serve.middleware.InternalErrorMiddleware`)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(InvalidUnicodeError, _unicode)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(PromptTooLongError, _too_long)
    app.add_exception_handler(ValueError, _value)
