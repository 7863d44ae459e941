"""``POST /v1/completions``: OpenAI's legacy completions, as lm-evaluation-harness's
``local-completions`` backend uses them.

One request body becomes one engine request per prompt, in five steps, each a place to extend:

1. prompts: :meth:`~deepwhale.serve.schemas.CompletionRequest.prompts` (a string, strings, token
   ids or token-id lists) -> token ids (:func:`encode_prompts`);
2. budgets: :meth:`~deepwhale.serve.serving.Serving.budget` per prompt (``max_tokens: 0`` with
   ``echo`` scores the prompt only: no engine request);
3. one :class:`~deepwhale.inference.sampling.SamplingParams` per prompt, then submission;
4. stream (one prompt) or wait; with ``echo`` and ``logprobs`` the prompt tokens are scored by
   :func:`~deepwhale.inference.prompt_logprobs.prompt_logprobs` (first entry null);
5. choices: ``index = i * n + j`` for sample ``j`` of prompt ``i`` (OpenAI's numbering), legacy
   ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

Reference: https://platform.openai.com/docs/api-reference/completions/create; lm-eval 0.4.13
``lm_eval/models/openai_completions.py`` (``LocalCompletionsAPI`` reads ``logprobs`` of echoed
prompts).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from sse_starlette import EventSourceResponse

from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.inference.engine import Sequence
from deepwhale.inference.generate import GenerationChunk, TokenLogprob
from deepwhale.inference.prompt_logprobs import prompt_logprobs
from deepwhale.serve.errors import APIError
from deepwhale.serve.schemas import CompletionRequest
from deepwhale.serve.serving import Serving, usage_of
from deepwhale.serve.sse import ChoiceFn, stream_response
from deepwhale.tokenizer import Tokenizer


async def create_completion(serving: Serving, body: CompletionRequest, request: Request):
    """Answer one ``/v1/completions`` body: a ``text_completion`` object, or an SSE stream.

    Raises:
        APIError: streaming several prompts, an empty prompt, token ids outside the vocabulary,
            a budget that does not fit (see :meth:`Serving.budget`), or the client leaving.
        ValueError: sampling values out of range (400).
    """
    serving.authorize(request, body.model, body.prompt)
    serving.check_model(body.model)
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise APIError("stream is supported with one prompt only", param="stream")
    ids_list = await encode_prompts(serving, request, prompts)
    budgets = [serving.budget(ids, body.max_tokens, "max_tokens", body.echo) for ids in ids_list]
    params = [serving.sampling_params(body, max(b, 1)) for b in budgets]
    reqs = [
        serving.submit(ids, p, body.n, body.logprobs) if b else None
        for ids, b, p in zip(ids_list, budgets, params, strict=True)
    ]
    live = [r for r in reqs if r is not None]
    if len(reqs) == 1 and live:
        request.state.audit_request = live[0]
    if body.stream:
        return _stream(serving, request, live[0], body)
    echoed: list[list[TokenLogprob | None] | None] = [None] * len(reqs)
    if body.echo and body.logprobs is not None:
        module = serving.model.module
        echoed = [
            await asyncio.to_thread(prompt_logprobs, module, ids, body.logprobs) for ids in ids_list
        ]
    if live:
        await serving.bridge.drain(live, request)
    tok = serving.model.tokenizer
    choices = []
    for i, (prompt, ids, req) in enumerate(zip(prompts, ids_list, reqs, strict=True)):
        choices += _prompt_choices(tok, body, i, prompt, ids, req, echoed[i])
    generated = sum(r.num_generated for r in live)
    request.state.audit_completion_tokens = generated
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": serving.model_name,
        "choices": choices,
        "usage": usage_of(sum(len(ids) for ids in ids_list), generated),
    }


async def encode_prompts(serving: Serving, request: Request, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized in a worker thread, token-id lists are
    checked against the vocabulary (APIError 400 naming ``prompt``); the total is noted for the
    audit log."""
    vocab = serving.model.config.vocab_size
    out = []
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise APIError("prompt must not be empty", param="prompt")
            out.append(await asyncio.to_thread(serving.model.encode_prompt, p))
        elif any(not 0 <= i < vocab for i in p):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        else:
            out.append(list(p))
    request.state.audit_prompt_tokens = sum(len(ids) for ids in out)
    return out


def _stream(
    serving: Serving, request: Request, req: EngineRequest, body: CompletionRequest
) -> EventSourceResponse:
    """The SSE stream of one prompt's ``text_completion`` chunks."""
    logprobs = body.logprobs is not None
    return stream_response(
        serving.bridge,
        request,
        req,
        obj="text_completion",
        model_name=serving.model_name,
        choice=_stream_choice(serving.model.tokenizer, req.n, logprobs),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        logprobs=logprobs,
    )


def _stream_choice(tok: Tokenizer, n: int, logprobs: bool) -> ChoiceFn:
    """A streamed choice: the text delta, and with ``logprobs`` that token's legacy logprobs
    (``text_offset`` counts characters streamed so far for that sample)."""
    offsets = [0] * n

    def choice(i: int, chunk: GenerationChunk) -> dict:
        lps = [chunk.logprobs] if logprobs and chunk.logprobs is not None else None
        lp = completion_logprobs(tok, lps, [offsets[i]]) if lps else None
        offsets[i] += len(chunk.text)
        return {
            "index": i,
            "text": chunk.text,
            "logprobs": lp,
            "finish_reason": chunk.finish_reason,
        }

    return choice


def _prompt_choices(
    tok: Tokenizer,
    body: CompletionRequest,
    i: int,
    prompt: str | list[int],
    ids: list[int],
    req: EngineRequest | None,
    echoed: list[TokenLogprob | None] | None,
) -> list[dict]:
    """The ``n`` choices of prompt ``i`` (``req`` None: nothing generated, ``max_tokens: 0``);
    with ``echo`` the prompt text (as sent, or decoded token ids) comes first."""
    head = ""
    if body.echo:
        head = prompt if isinstance(prompt, str) else tok.decode(ids)
    samples: list[tuple[int, Sequence | None, str]] = (
        [(j, None, "") for j in range(body.n)]
        if req is None
        else [(s.index, s, t) for s, t in zip(req.sequences, req.texts(), strict=True)]
    )
    out = []
    for j, seq, text in samples:
        lp = None
        if body.logprobs is not None:
            lp = _choice_logprobs(tok, ids, seq, head, echoed if body.echo else None)
        finish = "length" if seq is None else seq.finish_reason
        out.append(
            {"index": i * body.n + j, "text": head + text, "logprobs": lp, "finish_reason": finish}
        )
    return out


def _choice_logprobs(
    tok: Tokenizer,
    ids: list[int],
    seq: Sequence | None,
    head: str,
    echoed: list[TokenLogprob | None] | None,
) -> dict:
    """Legacy ``logprobs`` of one choice: the echoed prompt's (if ``echoed``), then the
    completion's, offsets shifted by the echoed text ``head``."""
    lps = [] if seq is None else seq.logprobs
    offsets = [] if seq is None else text_offsets(tok, ids, lps)
    lp = completion_logprobs(tok, lps, offsets)
    if echoed is None:
        return lp
    pre = echo_logprobs(tok, ids, echoed)
    joined = {k: pre[k] + lp[k] for k in ("tokens", "token_logprobs", "top_logprobs")}
    return joined | {"text_offset": pre["text_offset"] + [o + len(head) for o in offsets]}


def text_offsets(tok: Tokenizer, prompt_ids: list[int], lps: list[TokenLogprob]) -> list[int]:
    """Character offset in the completion text where each token's text starts: the
    cumulative lengths of the streamed deltas (the same incremental detokenizer as the
    engine, so they equal the offsets a stream reports)."""
    detok = tok.detokenizer(prompt_ids, skip_special_tokens=True)
    offsets, offset = [], 0
    for lp in lps:
        offsets.append(offset)
        offset += len(detok.add(lp.token_id))
    return offsets


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offsets: list[int]) -> dict:
    """OpenAI legacy ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset
    (``offsets``, characters into the completion text). Token texts keep their leading space
    (:meth:`deepwhale.tokenizer.Tokenizer.token_text`)."""
    return {
        "tokens": [tok.token_text(lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{tok.token_text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def echo_logprobs(tok: Tokenizer, ids: list[int], entries: list[TokenLogprob | None]) -> dict:
    """Legacy ``logprobs`` of the prompt tokens (``echo``): ``entries[0]`` is None, so the
    first token's ``token_logprobs`` and ``top_logprobs`` are null; offsets are characters
    into the decoded prompt."""
    detok = tok.detokenizer([], skip_special_tokens=True)
    offsets, offset = [], 0
    for t in ids:
        offsets.append(offset)
        offset += len(detok.add(t))
    return {
        "tokens": [tok.token_text(t) for t in ids],
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [
            None if e is None else {tok.token_text(t): v for t, v in e.top} for e in entries
        ],
        "text_offset": offsets,
    }
