"""vLLM's tokenizer routes: ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from deepwhale.serve import serving_tokenizer
from deepwhale.serve.routes import serving_of
from deepwhale.serve.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    """vLLM's ``GET /tokenizer_info``: special tokens, chat template and context, so
    lm-eval's ``tokenizer_backend=remote`` (and ``auto``) needs no local tokenizer."""
    return serving_tokenizer.tokenizer_info(serving_of(request))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """vLLM's ``POST /tokenize``: ``{tokens, count, max_model_len}`` of ``prompt``."""
    return await serving_tokenizer.tokenize(serving_of(request), body, request)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    """vLLM's ``POST /detokenize``: the text of ``tokens`` (special tokens kept)."""
    return serving_tokenizer.detokenize(serving_of(request), body)
