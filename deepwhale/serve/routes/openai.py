"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (https://platform.openai.com/docs/api-reference)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deepwhale.serve.routes import serving_of
from deepwhale.serve.schemas import ChatCompletionRequest, CompletionRequest
from deepwhale.serve.serving_chat import create_chat_completion
from deepwhale.serve.serving_completions import create_completion

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """OpenAI ``GET /v1/models``: the one model served, if the caller's key may use it."""
    serving = serving_of(request)
    key = getattr(request.state, "api_key", None)
    if key is not None and not key.allows_model(serving.model_name):
        return {"object": "list", "data": []}
    card = {
        "id": serving.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "deepwhale",
        "max_model_len": serving.model.engine.max_seq_len,  # vLLM's field: the context, tokens
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI ``POST /v1/completions``: one prompt or a list (strings or token ids)."""
    return await create_completion(serving_of(request), body, request)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI ``POST /v1/chat/completions`` through the model's chat template."""
    return await create_chat_completion(serving_of(request), body, request)
