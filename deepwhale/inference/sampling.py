"""Token sampling with the OpenAI / HF semantics: temperature, top-k, top-p, min-p and penalties.

References: nucleus sampling (Holtzman et al., arXiv:1904.09751); min-p (Nguyen et al.,
arXiv:2407.01082); repetition penalty (Keskar et al., CTRL, arXiv:1909.05858); presence and
frequency penalties as the OpenAI API defines them
(``logit -= presence * (count > 0) + frequency * count``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deepwhale.inference.guided import GuidedDecoding

#: temperatures below this sample greedily
GREEDY_TEMPERATURE = 1e-5


class NonFiniteLogitsError(FloatingPointError):
    """The model produced NaN logits: broken weights or an unstable dtype, never a valid token."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Attributes:
        temperature: divides the logits; 0 means greedy (argmax).
        top_k: keep only the k most likely tokens (0: off).
        top_p: keep the smallest set of tokens whose probability mass reaches ``top_p`` (1: off).
        min_p: drop tokens whose probability is below ``min_p`` times the top token's (0: off).
        repetition_penalty: CTRL-style penalty on tokens already seen (1: off).
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted per occurrence of every token already generated.
        max_new_tokens: generation budget, tokens.
        stop: strings that end generation; they are not part of the output.
        seed: makes sampling reproducible (a per-request ``torch.Generator``).
        ignore_eos: keep generating past the end-of-sequence token.
        guided: a structured-output constraint enforced while decoding
            (:class:`deepwhale.inference.guided.GuidedDecoding`), or None.

    Raises:
        ValueError: a value outside its range (message names it).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or not all(
            isinstance(s, str) for s in self.stop
        ):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in self.stop if s]
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not -(2**63) <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", 0.01 <= self.repetition_penalty <= 100, "in [0.01, 100]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax: ``top_k == 1`` or a temperature below 1e-5
        (as vLLM does; dividing logits by a tinier temperature overflows to inf)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A generator seeded with ``seed``, or None to use the global RNG."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def apply_penalties(
    logits: torch.Tensor,
    prompt_tokens: torch.Tensor | None,
    output_tokens: torch.Tensor | None,
    params: SamplingParams,
) -> torch.Tensor:
    """Apply repetition, presence and frequency penalties.

    Args:
        logits: ``(V,)`` fp32 logits of one sequence.
        prompt_tokens: ``(P,)`` prompt ids (repetition penalty counts them too), or None.
        output_tokens: ``(G,)`` generated ids so far, or None.
        params: the penalties.

    Returns new ``(V,)`` logits.
    """
    if params.repetition_penalty != 1.0:
        seen = [t for t in (prompt_tokens, output_tokens) if t is not None and t.numel()]
        if seen:
            ids = torch.unique(torch.cat(seen))
            vals = logits[ids]
            vals = torch.where(
                vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty
            )
            logits = logits.clone()
            logits[ids] = vals
    if (params.presence_penalty or params.frequency_penalty) and output_tokens is not None:
        counts = torch.bincount(output_tokens, minlength=logits.shape[-1]).to(logits.dtype)
        logits = (
            logits
            - params.frequency_penalty * counts
            - params.presence_penalty * (counts > 0).to(logits.dtype)
        )
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering; removed tokens get ``-inf``.

    Args:
        logits: ``(B, V)`` fp32.

    Returns ``(B, V)`` logits ready for softmax sampling (``temperature`` must be > 0).
    """
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        floor = params.min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: ``(B, V)`` logits (any float dtype; computed in fp32).
        params: sampling settings.
        generator: RNG for reproducible sampling.

    Returns ``(B,)`` int64 token ids.
    """
    logits = logits.float()
    if bool(torch.isnan(logits).any()):
        raise NonFiniteLogitsError(
            "the model produced NaN logits; check the weights (a corrupt file?) and the dtype"
        )
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
