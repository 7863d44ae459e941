"""vLLM's tokenizer endpoints: ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``
(vLLM ``entrypoints/openai/serving_tokenization.py``'s request and response fields), so
lm-eval's ``tokenizer_backend=remote`` (and ``auto``) needs no local tokenizer."""

from __future__ import annotations

import asyncio

from fastapi import Request

from deepwhale.serve.errors import APIError
from deepwhale.serve.schemas import DetokenizeRequest, TokenizeRequest
from deepwhale.serve.serving import Serving


def tokenizer_info(serving: Serving) -> dict:
    """Special tokens, chat template and context (``model_max_length``, tokens)."""
    tok = serving.model.tokenizer
    return {
        "tokenizer_class": "deepwhale.tokenizer.Tokenizer",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "add_bos_token": tok.add_bos_token,
        "chat_template": tok.chat_template,
        "model_max_length": serving.model.engine.max_seq_len,
    }


async def tokenize(serving: Serving, body: TokenizeRequest, request: Request) -> dict:
    """``{tokens, count, max_model_len}`` of ``body.prompt``, tokenized in a worker thread."""
    serving.authorize(request, body.model, body.prompt)
    serving.check_model(body.model)
    tok = serving.model.tokenizer
    ids = await asyncio.to_thread(tok.encode, body.prompt, body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.model.engine.max_seq_len}


def detokenize(serving: Serving, body: DetokenizeRequest) -> dict:
    """``{prompt}``: the text of ``body.tokens`` (special tokens kept).

    Raises:
        APIError: a token id outside the vocabulary (400 naming ``tokens``).
    """
    serving.check_model(body.model)
    vocab = serving.model.config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
    return {"prompt": serving.model.tokenizer.decode(body.tokens)}
