"""``POST /v1/embeddings``: OpenAI embeddings from the served model's final hidden states.

Each input (a string, tokenized as a prompt with the tokenizer's BOS rule, or token ids) runs
through the model once, outside the engine (no cache slot, no sampling):
:meth:`deepwhale.api.DeepSeekModel.embed` pools the hidden states after the final norm (``mean``
over the input's tokens by default; ``last``: its last token) and L2-normalises them, as vLLM's
and OpenAI's embeddings are. The pooling is the server's (``create_app(embedding_pooling=)``,
``deepwhale serve --embedding-pooling``) unless the body's ``pooling`` names one. Answer shape:
https://platform.openai.com/docs/api-reference/embeddings/object.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import Request

from deepwhale.serve.errors import APIError
from deepwhale.serve.schemas import EmbeddingRequest
from deepwhale.serve.serving import Serving


async def create_embedding(serving: Serving, body: EmbeddingRequest, request: Request) -> dict:
    """Answer one embeddings body: ``{"object": "list", "data": [{"object": "embedding",
    "index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``; each
    ``embedding`` is ``hidden_size`` floats, or their little-endian float32 bytes in base64.

    Raises:
        APIError: an unknown model (404), ``dimensions`` other than the hidden size, token ids
            outside the vocabulary, or an input longer than the context (400
            ``context_length_exceeded``, naming the input).
    """
    serving.authorize(request, body.model, body.input)
    serving.check_model(body.model)
    hidden = serving.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise APIError(
            f"dimensions other than this model's hidden size ({hidden}) are not supported",
            param="dimensions",
        )
    model = serving.model
    vocab = model.config.vocab_size
    for i, x in enumerate(body.inputs()):
        if not isinstance(x, str) and any(not 0 <= t < vocab for t in x):
            raise APIError(f"input {i}: token ids must be in [0, {vocab})", param="input")
    ids = await asyncio.to_thread(lambda: [model.encode_prompt(x) for x in body.inputs()])
    tokens = sum(len(x) for x in ids)
    request.state.audit_prompt_tokens = tokens
    ctx = model.engine.max_seq_len
    for i, x in enumerate(ids):
        if len(x) > ctx:
            raise APIError(
                f"input {i} is {len(x)} tokens, but this model's context is {ctx} tokens; "
                "shorten it",
                param="input",
                code="context_length_exceeded",
            )
    pooling = body.pooling or serving.embedding_pooling
    vectors = await asyncio.to_thread(model.embed, ids, pooling)  # (N, H) float32
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": serving.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector, encoding_format: str) -> list[float] | str:
    """One ``(H,)`` float32 vector as JSON floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
