"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/chat/completions``, ``POST /v1/responses`` (https://platform.openai.com/docs/api-reference)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deepwhale.serve.routes import serving_of
from deepwhale.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseRequest,
)
from deepwhale.serve.serving_chat import create_chat_completion
from deepwhale.serve.serving_completions import create_completion
from deepwhale.serve.serving_embeddings import create_embedding
from deepwhale.serve.serving_responses import create_response

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """OpenAI ``GET /v1/models``: the one model served, if the caller's key may use it."""
    return {"object": "list", "data": serving_of(request).model_cards(request)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    """OpenAI ``GET /v1/models/{model}``: the model object of ``model_id`` (ids may hold
    slashes); 404 ``model_not_found`` for any other id."""
    return serving_of(request).model_card(request, model_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``: one prompt or a list (strings or token ids)."""
    return await create_completion(serving_of(request), body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions`` through the model's chat template."""
    return await create_chat_completion(serving_of(request), body, request)


@router.post("/v1/responses")
async def responses(body: ResponseRequest, request: Request):
    """OpenAI ``POST /v1/responses`` (stateless) through the model's chat template."""
    return await create_response(serving_of(request), body, request)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """OpenAI ``POST /v1/embeddings``: pooled, L2-normalised final hidden states per input."""
    return await create_embedding(serving_of(request), body, request)
