"""``POST /generate``: the body and answer of DeepSeek's FastAPI serving example."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deepwhale.serve.routes import serving_of
from deepwhale.serve.schemas import GenerateRequest
from deepwhale.serve.serving import generate as serve_generate

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict:
    """DeepSeek's FastAPI example: ``{prompt, max_length, ...}`` -> ``{output, usage}``;
    ``max_length`` counts the prompt, like :func:`deepwhale.api.generate_text`."""
    return await serve_generate(serving_of(request), body, request)
