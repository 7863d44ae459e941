"""The serving layer: a validated request body in, one typed engine request out.

Each endpoint's path is the same: :meth:`Serving.authorize` (audit fields, per-key model grants)
-> :meth:`Serving.check_model` -> tokenize off the event loop (:meth:`Serving.encode`) ->
:meth:`Serving.budget` (new tokens against the context) -> :meth:`Serving.sampling_params` (ONE
:class:`~deepwhale.inference.sampling.SamplingParams`, validated once) -> :meth:`Serving.submit`
(:meth:`deepwhale.api.DeepSeekModel.submit` -> :meth:`~deepwhale.inference.engine.Engine.add_request`)
-> wait (:meth:`~deepwhale.serve.bridge.EngineBridge.drain`) or stream
(:func:`~deepwhale.serve.sse.stream_response`) -> format. The endpoint-specific halves live in
:mod:`deepwhale.serve.serving_completions` (``/v1/completions``),
:mod:`deepwhale.serve.serving_chat` (``/v1/chat/completions``),
:mod:`deepwhale.serve.serving_responses` (``/v1/responses``) and :func:`generate` here
(``/generate``); :mod:`deepwhale.serve.serving_embeddings` (``/v1/embeddings``) runs the model
directly, outside the engine. This layer knows FastAPI's ``Request`` only for ``request.state`` (audit) and
disconnects; routing is :mod:`deepwhale.serve.routes`.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request

from deepwhale.api import DeepSeekModel
from deepwhale.inference.engine import Request as EngineRequest
from deepwhale.inference.generate import PromptTooLongError
from deepwhale.inference.guided import GuidedDecoding
from deepwhale.inference.sampling import SamplingParams
from deepwhale.serve.bridge import EngineBridge
from deepwhale.serve.errors import APIError
from deepwhale.serve.metrics import Metrics
from deepwhale.serve.reasoning import resolve_reasoning_parser
from deepwhale.serve.schemas import GenerateRequest, SamplingFields
from deepwhale.serve.stats import LiveStats


class Serving:
    """What every endpoint shares: the model, its name, metrics, live stats and the bridge.

    Args:
        model: a loaded model with a tokenizer (its engine is made on first use).
        model_name: the id clients pass as ``model``.
        embedding_pooling: ``/v1/embeddings``' default pooling of the final hidden states,
            ``"mean"`` (over the input's tokens) or ``"last"`` (its last token).
        reasoning_parser: ``"auto"``, ``"deepseek_r1"`` or ``"none"``: whether chat answers
            split ``<think>...</think>`` into ``reasoning_content``
            (:func:`~deepwhale.serve.reasoning.resolve_reasoning_parser`).
        chat_template: a Jinja chat template source used instead of the tokenizer's (None:
            the tokenizer's own).

    Raises:
        ValueError: an unknown ``embedding_pooling`` or ``reasoning_parser``.

    Attributes:
        created: the server's start time, unix seconds (set here, and again when the app
            starts); ``created`` of the model object.
        reasoning: chat answers carry ``reasoning_content`` (the resolved parser choice).
    """

    def __init__(
        self,
        model: DeepSeekModel,
        model_name: str,
        embedding_pooling: str = "mean",
        *,
        reasoning_parser: str = "auto",
        chat_template: str | None = None,
    ) -> None:
        if embedding_pooling not in ("mean", "last"):
            raise ValueError(
                f"embedding_pooling must be 'mean' or 'last', got {embedding_pooling!r}"
            )
        self.model = model
        self.model_name = model_name
        self.embedding_pooling = embedding_pooling
        self.chat_template = chat_template
        self.reasoning = resolve_reasoning_parser(reasoning_parser, model.tokenizer, chat_template)
        self.created = int(time.time())
        self.metrics = Metrics(lambda: model.engine)
        self.stats = LiveStats(lambda: (len(model.engine.running), len(model.engine.waiting)))
        self.bridge = EngineBridge(lambda: model.engine, self.metrics, self.stats)

    # ------------------------------------------------------------------ models
    def model_cards(self, request: Request) -> list[dict]:
        """OpenAI model objects (``{id, object: "model", created, owned_by}`` plus vLLM's
        ``max_model_len``, the context in tokens) the request's API key may use: the one model
        served, or none."""
        key = getattr(request.state, "api_key", None)
        if key is not None and not key.allows_model(self.model_name):
            return []
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "deepwhale",
            "max_model_len": self.model.engine.max_seq_len,
        }
        return [card]

    def model_card(self, request: Request, model_id: str) -> dict:
        """The model object of ``model_id``, the same as its entry in :meth:`model_cards`.

        Raises:
            APIError: 404 ``model_not_found`` for an id not served (or not allowed to the key).
        """
        for card in self.model_cards(request):
            if card["id"] == model_id:
                return card
        raise APIError(
            f"The model '{model_id}' does not exist",
            status=404,
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------------ validation
    def authorize(self, request: Request, name: str | None, prompt) -> None:
        """Note the request's model and prompt for the audit log, and refuse (403,
        ``model_not_allowed``) a model the request's API key may not use."""
        state = request.state
        state.audit_model = name or self.model_name
        state.audit_prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        key = getattr(state, "api_key", None)
        if key is None:
            return
        for m in dict.fromkeys((name or self.model_name, self.model_name)):
            if not key.allows_model(m):
                raise APIError(
                    f"the API key '{key.id}' may not use the model '{m}'",
                    status=403,
                    type="permission_error",
                    param="model",
                    code="model_not_allowed",
                )

    def check_model(self, name: str | None) -> None:
        """Raises APIError (404 ``model_not_found``) unless ``name`` is None or the served one."""
        if name is not None and name != self.model_name:
            raise APIError(
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                status=404,
                param="model",
                code="model_not_found",
            )

    async def encode(self, request: Request, prompt: str | list[dict]) -> list[int]:
        """Token ids of a prompt, tokenized in a worker thread (a multi-megabyte prompt takes
        seconds); the count is noted for the audit log."""
        ids = await asyncio.to_thread(self.model.encode_prompt, prompt)
        request.state.audit_prompt_tokens = len(ids)
        return ids

    async def encode_chat(
        self, request: Request, messages: list[dict], tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of chat ``messages`` rendered with the chat template (the server's
        ``chat_template`` if set, else the tokenizer's, with the generation prompt; ``tools``
        passed to it as ``tools``), in a worker thread; the count is noted for the audit log.

        Raises:
            TokenizerError: no chat template, or it fails to render (a 400).
        """
        tok = self.model.tokenizer
        ids = await asyncio.to_thread(
            tok.apply_chat_template,
            messages,
            tokenize=True,
            chat_template=self.chat_template,
            tools=tools,
        )
        request.state.audit_prompt_tokens = len(ids)
        return ids

    def budget(
        self, prompt_ids: list[int], max_tokens: int | None, param: str, echo: bool = False
    ) -> int:
        """New-token budget: ``max_tokens`` checked against the context, or all that is left.
        With ``echo``, 0 is allowed (score the prompt only) and the prompt may fill the context.

        Raises:
            PromptTooLongError: the prompt does not fit (400 ``context_length_exceeded``).
            APIError: ``max_tokens`` below 1, or prompt + ``max_tokens`` over the context.
        """
        ctx = self.model.engine.max_seq_len
        scoring_only = echo and max_tokens == 0
        if len(prompt_ids) > ctx or (len(prompt_ids) == ctx and not scoring_only):
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens, but this model's context is {ctx} "
                "tokens; shorten the prompt"
            )
        if scoring_only:
            return 0
        if max_tokens is None:
            return ctx - len(prompt_ids)
        if max_tokens < 1:
            hint = (
                " (0 is allowed with echo: score the prompt only)" if param == "max_tokens" else ""
            )
            raise APIError(f"{param} must be >= 1, got {max_tokens}{hint}", param=param)
        if len(prompt_ids) + max_tokens > ctx:
            raise APIError(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion). Reduce the prompt or {param}.",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    @staticmethod
    def sampling_params(
        body: SamplingFields | GenerateRequest, max_new_tokens: int
    ) -> SamplingParams:
        """The one :class:`SamplingParams` of a request body (validated here, once).

        Structured output (``response_format``, ``guided_*``, ``text.format``) becomes
        ``guided``, a :class:`~deepwhale.inference.guided.GuidedDecoding`.

        Raises:
            ValueError: a value out of range (answered 400 with SamplingParams' message);
                GuidedDecodingError (a ValueError): a malformed constraint.
        """
        spec = body.guided_spec() if hasattr(body, "guided_spec") else None
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            max_new_tokens=max_new_tokens,
            stop=body.stop,
            seed=body.seed,
            ignore_eos=getattr(body, "ignore_eos", False),
            guided=GuidedDecoding(**spec) if spec is not None else None,
        )

    def submit(
        self, ids: list[int], params: SamplingParams, n: int = 1, logprobs: int | None = None
    ) -> EngineRequest:
        """Queue ``ids`` on the engine with ``params``; ``n`` samples, ``logprobs`` alternatives
        per token (None: no logprobs). Raises ValueError for ``n``/``logprobs`` out of range."""
        return self.model.submit(ids, params, n=n, logprobs=logprobs)


def usage(req: EngineRequest) -> dict:
    """OpenAI ``usage``: prompt, completion and total tokens of one engine request."""
    return usage_of(len(req.prompt_ids), req.num_generated)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI ``usage`` from token counts."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def generate(serving: Serving, body: GenerateRequest, request: Request) -> dict:
    """``POST /generate`` (DeepSeek's FastAPI example): ``{output, usage}``; ``max_length``
    counts the prompt, like :func:`deepwhale.api.generate_text`."""
    serving.authorize(request, None, body.prompt)
    if not body.prompt:
        raise APIError("prompt must not be empty", param="prompt")
    ids = await serving.encode(request, body.prompt)
    if body.max_new_tokens is not None:
        new, param = body.max_new_tokens, "max_new_tokens"
    else:
        new, param = body.max_length - len(ids), "max_length"
        if new < 1:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens, which leaves nothing of "
                f"max_length={body.max_length}"
            )
    params = serving.sampling_params(body, serving.budget(ids, new, param))
    req = serving.submit(ids, params)
    request.state.audit_request = req
    await serving.bridge.drain([req], request)
    return {"output": req.texts()[0], "usage": usage(req)}
