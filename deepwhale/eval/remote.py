"""Evaluate a model behind an OpenAI-compatible server: ``deepwhale eval --model http://HOST:PORT/v1``.

Log-likelihood requests go to ``POST /v1/completions`` as token-id prompts with
``echo: true, logprobs: 1, max_tokens: 0``: the server returns each prompt token's
log-probability given the tokens before it (the first one ``null``), and the continuation's
entries are summed, as lm-eval 0.4.x's ``local-completions`` backend does (it asks for
``max_tokens: 1`` and drops the last entry instead). ``is_greedy`` compares each entry with its
top alternative.

Tokenization happens here, with the tokenizer of the served checkpoint (``--tokenizer DIR``),
so the server scores exactly the ids a local run would.

The server's context is ``max_model_len`` (from ``GET /v1/models``, vLLM's field) or
``max_length``. A prompt must fit in it, and the last prompt token is only scored, never an
input. So this model's ``max_length`` is one less than the server's: a request of
``max_length + 1`` tokens or fewer is sent whole, longer ones keep their last
``max_length + 1`` tokens. This is the left truncation a local run applies
(:func:`deepwhale.eval.scoring.score_requests`), so scores equal a local run's at
``max_length`` equal to the server's context minus one.

Failures are retried and then reported, never counted as wrong answers:
- connection errors, timeouts, HTTP 429 and 5xx are retried up to ``max_retries`` times, with
  exponential backoff (``backoff * 2**k`` seconds, or the server's ``Retry-After``);
- then, or at once for any other 4xx, :class:`RemoteError` names the URL and the server's
  message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from deepwhale.eval.scoring import Score


class RemoteError(RuntimeError):
    """The server refused a request or kept failing after the retries (message names the URL)."""


def is_url(name: str | None) -> bool:
    """Whether ``--model`` names a server (``http://`` or ``https://``) rather than a folder."""
    return bool(name) and name.startswith(("http://", "https://"))


class RemoteModel:
    """A served model, seen by :func:`deepwhale.eval.runner.evaluate` like a local one.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        tokenizer: the served checkpoint's :class:`~deepwhale.tokenizer.Tokenizer`.
        api_key: bearer key (default ``$DEEPWHALE_API_KEY``, else ``$OPENAI_API_KEY``).
        model: model id to request (default: the first of ``GET /models``).
        max_length: the server's context, tokens (default: its ``max_model_len``).
        timeout: seconds per HTTP request.
        max_retries: retries after the first try for connection errors, timeouts, 429, 5xx.
        backoff: first retry delay, seconds (doubles each retry).

    Raises:
        RemoteError: the server is unreachable, refuses the key, or reports no context length
            and none is given.
    """

    device = "remote"
    dtype = "remote"

    def __init__(
        self,
        base_url: str,
        tokenizer,
        api_key: str | None = None,
        model: str | None = None,
        max_length: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        import httpx

        self.path = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.max_retries = max_retries
        self.backoff = backoff
        key = api_key or os.environ.get("DEEPWHALE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        cards = self._call("GET", "/models").get("data") or []
        if model is None:
            if not cards:
                raise RemoteError(f"{self.path}/models lists no model (is the key allowed one?)")
            model = cards[0]["id"]
        self.model = model
        card = next((c for c in cards if c.get("id") == model), {})
        length = max_length or card.get("max_model_len")
        if not isinstance(length, int) or length < 2:
            raise RemoteError(
                f"{self.path}/models gives no max_model_len for {model}; pass --max-length"
            )
        self.config = SimpleNamespace(max_position_embeddings=length - 1)

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        import httpx

        url = f"{self.path}{route}"
        last = ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff * 2**attempt
            try:
                r = self._http.request(method, url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r.json()
                last = f"HTTP {r.status_code}: {_message(r)}"
                if r.status_code != 429 and r.status_code < 500:
                    raise RemoteError(f"{url}: {last}")
                after = r.headers.get("Retry-After", "")
                delay = float(after) if after.replace(".", "", 1).isdigit() else delay
            if attempt < self.max_retries:
                time.sleep(delay)
        raise RemoteError(f"{url}: failed after {self.max_retries + 1} tries; last: {last}")

    def identity(self) -> dict:
        """What cached scores depend on (``--resume``): URL, model id, context. The server's
        weights are not visible from here; a different checkpoint behind the same URL and
        model id must use a fresh ``--out``."""
        return {
            "url": self.path,
            "model": self.model,
            "max_length": self.config.max_position_embeddings,
        }

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    # ------------------------------------------------------------------ scoring
    def score_requests(
        self,
        requests: Sequence[tuple[list[int], list[int]]],
        max_len: int,
        batch_size: int = 1,
        progress: Callable[[int], None] | None = None,
        on_batch: Callable[[list[int], list[Score]], None] | None = None,
    ) -> list[Score]:
        """Score ``(context_ids, continuation_ids)`` pairs on the server, ``batch_size`` prompts
        per HTTP request; the same contract as :func:`deepwhale.eval.scoring.score_requests`.

        Raises:
            ValueError: an empty context or continuation, or a continuation longer than
                ``max_len``.
            RemoteError: see the module docstring.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prompts = []
        for i, (ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation")
            if len(cont) > max_len:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens > max_len {max_len}"
                )
            prompts.append((ctx + cont)[-(max_len + 1) :])
        out: list[Score] = []
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            body = {
                "model": self.model,
                "prompt": [prompts[i] for i in idx],
                "echo": True,
                "logprobs": 1,
                "max_tokens": 0,
                "temperature": 0,
            }
            choices = sorted(self._call("POST", "/completions", body)["choices"], key=_index)
            if len(choices) != len(idx):
                raise RemoteError(f"{self.path}/completions: {len(choices)} choices for {len(idx)}")
            got = [_score(c, len(requests[i][1])) for c, i in zip(choices, idx, strict=True)]
            out.extend(got)
            if on_batch is not None:
                on_batch(idx, got)
            if progress is not None:
                progress(len(idx))
        return out

    def generate_batch(
        self,
        prompts: Sequence[list[int]],
        temperature: float = 0,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
    ) -> list[str]:
        """Greedy completions of token-id ``prompts`` from ``/v1/completions`` (one HTTP
        request for the batch), for generate_until tasks.

        The texts are the server's (OpenAI semantics: decoded after the prompt, so a
        SentencePiece model's first token keeps its leading space, which lm-eval's HF model,
        decoding the new tokens alone, drops).

        Raises:
            ValueError: ``temperature`` other than 0 (greedy only).
            RemoteError: see the module docstring.
        """
        if temperature != 0:
            raise ValueError("remote generation for evaluation is greedy: temperature must be 0")
        body = {
            "model": self.model,
            "prompt": [list(p) for p in prompts],
            "max_tokens": max_new_tokens,
            "temperature": 0,
            "stop": list(stop)[:16] or None,
        }
        choices = sorted(self._call("POST", "/completions", body)["choices"], key=_index)
        if len(choices) != len(prompts):
            raise RemoteError(f"{self.path}/completions: {len(choices)} choices for {len(prompts)}")
        return [c.get("text") or "" for c in choices]


def _index(choice: dict) -> int:
    return choice["index"]


def _score(choice: dict, n: int) -> Score:
    lp = choice.get("logprobs") or {}
    values = (lp.get("token_logprobs") or [])[-n:]
    tops = (lp.get("top_logprobs") or [])[-n:]
    if len(values) != n or any(v is None for v in values) or len(tops) != n:
        raise RemoteError("the server's echo logprobs do not cover the continuation")
    greedy = all(top and v >= max(top.values()) for v, top in zip(values, tops, strict=True))
    return Score(float(sum(values)), bool(greedy), n)


def _message(r) -> str:
    try:
        err = r.json().get("error")
    except ValueError:
        return r.text[:200]
    return err.get("message", str(err)) if isinstance(err, dict) else str(err)
