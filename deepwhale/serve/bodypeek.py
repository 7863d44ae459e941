"""The ``model`` a request body names, read from a bounded prefix, for the audit rows of requests
refused before a route parses them (401, 403, 429 from auth; 413 from the body limit).

Only the first :data:`PEEK_BYTES` (64 KiB) are read, and only top-level keys of a JSON object are
looked at: the scanner walks ``{"key": value, ...}`` with :meth:`json.JSONDecoder.raw_decode`
one member at a time, so a ``"model"`` nested in ``messages`` or ``metadata`` is not taken, and a
body cut mid-value still yields a ``model`` that came before the cut. Anything else (not JSON,
not an object, no string ``model``, a name over :data:`MAX_MODEL_CHARS`) yields None, never an
error. As with :func:`json.loads`, the last of duplicate keys wins.
"""

from __future__ import annotations

import asyncio
import json

#: bytes of a refused request's body read to find its model
PEEK_BYTES = 64 * 1024
#: longest string taken as a model name (longer ones are not recorded)
MAX_MODEL_CHARS = 256
#: seconds a refusal waits for the body prefix before answering without a model
PEEK_TIMEOUT_S = 5.0

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def model_from_prefix(prefix: bytes) -> str | None:
    """The top-level string ``model`` of the JSON object that ``prefix`` starts (or is).

    Args:
        prefix: the first bytes of a request body (UTF-8; a multi-byte character cut at the end
            is dropped).

    Returns:
        The model name, or None when the prefix is not the start of a JSON object naming a
        string model of 1 to :data:`MAX_MODEL_CHARS` characters before the cut.
    """
    text = prefix.decode("utf-8", errors="ignore")
    model = None
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return None
    i += 1
    try:
        while True:
            i = _skip(text, i)
            if text.startswith("}", i):
                break
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if not isinstance(key, str) or not text.startswith(":", i):
                return None
            value, i = _DECODER.raw_decode(text, _skip(text, i + 1))
            if key == "model":
                model = value
            i = _skip(text, i)
            if text.startswith(",", i):
                i += 1
            elif text.startswith("}", i):
                break
            else:
                return None
    except (ValueError, RecursionError):  # cut mid-member (or not JSON): keep what came before
        pass
    if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS:
        return model
    return None


async def _read_prefix(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[:limit]


def has_body(scope) -> bool:
    """Whether the request announces a body (a non-zero ``Content-Length`` or chunked)."""
    headers = dict(scope.get("headers", ()))
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"chunked" in headers.get(b"transfer-encoding", b"").lower()


async def peek_model(receive, limit: int = PEEK_BYTES) -> str | None:
    """Read up to ``limit`` bytes of the body from the ASGI ``receive`` and return its model
    (:func:`model_from_prefix`). Only for a request that is then refused: the bytes read are
    gone for any app after it. Gives up (None) after :data:`PEEK_TIMEOUT_S` seconds."""
    try:
        prefix = await asyncio.wait_for(_read_prefix(receive, limit), PEEK_TIMEOUT_S)
    except (asyncio.TimeoutError, OSError):
        return None
    return model_from_prefix(prefix)
