"""Single-sequence generation: prefill, decode one token at a time, sample, stream text.

Decoding is split the gpt-fast way: :func:`prefill` runs the whole prompt once and fills the
static cache; :func:`decode_one_token` runs one position; :func:`~deepwhale.inference.sampling.sample`
picks the token. Text is streamed through the tokenizer's incremental detokenizer, and any text
that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deepwhale.inference.sampling import SamplingParams, apply_penalties, sample
from deepwhale.model.cache import make_cache
from deepwhale.model.transformer import CausalLM


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and its most likely alternatives (natural log)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationChunk:
    """One streamed step.

    Attributes:
        text: new text (may be empty while a possible stop string is held back).
        token_id: the sampled token id, or None for the final flush.
        finish_reason: None while running, then ``"stop"`` (EOS or a stop string), ``"length"``,
            or ``"cancelled"`` (engine requests only).
        logprobs: the sampled token's :class:`TokenLogprob` when the request asked for
            logprobs, else None.
    """

    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprobs: TokenLogprob | None = None


@torch.inference_mode()
def prefill(model: CausalLM, prompt: torch.Tensor, caches: list) -> torch.Tensor:
    """Run the prompt ``(1, P)`` through the model, filling ``caches``; return last logits ``(1, V)``."""
    return model(prompt, caches=caches, last_only=True)[:, -1]


@torch.inference_mode()
def decode_one_token(
    model: CausalLM, token: torch.Tensor, position: int, caches: list
) -> torch.Tensor:
    """Run one token ``(1, 1)`` at ``position``; return its logits ``(1, V)``."""
    pos = torch.full((1, 1), position, device=token.device)
    return model(token, positions=pos, caches=caches)[:, -1]


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """One sequence's text as tokens arrive: incremental detokenisation, stop strings, and the
    hold-back of text that could still become a stop string. Single-sequence generation and
    the engine both stream through it, so they cut and emit text the same way.

    Args:
        detok: the tokenizer's incremental detokenizer (``add(token) -> str``, ``flush()``).
        stop: stop strings (the text before the first one is kept; the stop itself is not).
    """

    def __init__(self, detok, stop: list[str] | None) -> None:
        self.detok = detok
        self.stop = list(stop or [])
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        """Append ``token``; return ``(new text to emit, finish reason or None)``.

        ``last``: no token will follow (the budget or the context is used up), so everything
        is flushed and the reason is ``"length"`` unless a stop string ends it first.
        """
        self.text += self.detok.add(token)
        if last:
            self.text += self.detok.flush()
        if self.stop:
            # text before `emitted` was held back from every stop prefix, so search from there
            hit = min(
                (i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0), default=-1
            )
            if hit >= 0:
                self.text = self.text[:hit]
                return self.rest(), "stop"
        if last:
            return self.rest(), "length"
        safe = len(self.text) - (stop_holdback(self.text, self.stop) if self.stop else 0)
        chunk = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return chunk, None

    def eos(self) -> str:
        """The end of sequence was sampled: flush the detokenizer and return what is left."""
        self.text += self.detok.flush()
        return self.rest()

    def rest(self) -> str:
        """Everything not emitted yet (the sequence ends now)."""
        chunk = self.text[self.emitted :]
        self.emitted = len(self.text)
        return chunk

    @property
    def final_text(self) -> str:
        """The text handed out so far (the whole output once the sequence has finished)."""
        return self.text[: self.emitted]


def generate_stream(
    model: CausalLM,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
) -> Iterator[GenerationChunk]:
    """Generate from ``prompt_ids`` and yield text deltas.

    Args:
        model: the language model (any device; fp32 on CPU recommended).
        tokenizer: a :class:`deepwhale.tokenizer.Tokenizer` (``detokenizer()`` and
            ``eos_token_ids`` are used).
        prompt_ids: the encoded prompt, tokens (BOS included if the model wants one).
        params: sampling and stopping settings. ``max_new_tokens`` is cut to what the context
            (``max_position_embeddings``) has left; that ends with ``finish_reason="length"``.

    Yields:
        :class:`GenerationChunk` items; the last one carries ``finish_reason``. The
        concatenated ``text`` equals the decoded output up to (excluding) any stop string.

    Raises:
        PromptTooLongError: the prompt is empty or leaves no room for one new token (raised
            when called, before the first chunk).
    """
    ctx = model.config.max_position_embeddings
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise PromptTooLongError("the prompt is empty (no tokens); pass some text or a BOS token")
    if n_prompt >= ctx:
        raise PromptTooLongError(
            f"the prompt is {n_prompt} tokens, but the model's context is {ctx} tokens "
            "(max_position_embeddings); shorten the prompt"
        )
    return _generate(
        model, tokenizer, prompt_ids, params, min(params.max_new_tokens, ctx - n_prompt)
    )


def _generate(model, tokenizer, prompt_ids, params, budget) -> Iterator[GenerationChunk]:
    n_prompt = len(prompt_ids)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    caches = make_cache(model.config, 1, n_prompt + budget, dtype=dtype, device=device)
    generator = params.make_generator(device)
    prompt = torch.tensor([prompt_ids], device=device)
    eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
    stream = TextStream(
        tokenizer.detokenizer(prompt_ids=prompt_ids, skip_special_tokens=True), params.stop
    )
    needs_history = params.repetition_penalty != 1 or params.presence_penalty
    needs_history = needs_history or params.frequency_penalty
    output: list[int] = []
    logits = prefill(model, prompt, caches)
    for step in range(budget):
        if needs_history:
            out_t = torch.tensor(output, device=device, dtype=torch.long)
            logits = apply_penalties(logits[0].float(), prompt[0], out_t, params)[None]
        token = int(sample(logits, params, generator)[0])
        if token in eos:
            yield GenerationChunk(stream.eos(), None, "stop")
            return
        output.append(token)
        text, finish = stream.add(token, last=step == budget - 1)
        yield GenerationChunk(text, token, finish)
        if finish is not None:
            return
        logits = decode_one_token(
            model, torch.tensor([[token]], device=device), n_prompt + step, caches
        )
