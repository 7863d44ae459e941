"""Speculative decoding, batch 1: a draft proposes ``k`` tokens, the target verifies them in one
forward over ``k + 1`` positions through its KV cache, and the longest prefix that matches the
target's own greedy choice is kept, plus the target's next token (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding", arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318). With sampling, :func:`accept_reject` applies their rejection rule instead, so
the output keeps the target's distribution.

Two drafts:

* :class:`ModelDrafter`: a separate, smaller causal LM with the same tokenizer (e.g. a small
  R1-Distill for a larger one), with its own cache.
* :class:`MTPDrafter`: DeepSeek-V3's multi-token-prediction module (DeepSeek-V3 §2.2, §5.4.3,
  "MTP for speculative decoding"), fed with the target's final hidden states: module 0 drafts the
  first token from ``(h_i, t_{i+1})``, and further tokens re-apply it to its own output ``g``
  and its own draft, the chaining vLLM's MTP proposer uses.

The output is token-identical to plain greedy decoding (:func:`greedy_decode`, the
prefill/decode loop of :mod:`deepwhale.inference.generate`): every kept token is the target's
argmax given the tokens before it. That holds exactly in fp32; in bf16 the ``k + 1``-token verify
forward rounds differently from one-token decode steps, so a near-tie can resolve the other way
(stories260K in bf16: 7 of 8 prompts identical over 100 tokens, one diverged at token 77). Rolling the caches back is free: a static cache slot past the
committed length is masked out (a query at position ``p`` reads slots ``0..p``) and written over
by the next verify step; the drafts re-feed what they have not seen from the first position
where their cache and the committed tokens differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from deepwhale.inference.generate import PromptTooLongError, decode_one_token, prefill
from deepwhale.inference.sampling import SamplingParams, filter_logits
from deepwhale.model.cache import make_cache
from deepwhale.model.mtp import make_mtp_cache
from deepwhale.model.transformer import CausalLM


@dataclass
class SpeculativeStats:
    """Counters of one speculative run.

    Attributes:
        rounds: verify forwards of the target (one per round).
        drafted: draft tokens proposed.
        accepted: draft tokens kept.
        proposed_at: ``proposed_at[j]``: rounds whose draft reached position ``j`` (0-based).
        accepted_at: ``accepted_at[j]``: rounds whose draft token ``j`` was kept (so
            ``accepted_at[0] / proposed_at[0]`` is the first draft token's acceptance rate, the
            figure DeepSeek-V3 §5.4.3 reports as 85-90% for its second predicted token).
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens over proposed ones (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """New tokens per target verify forward: accepted drafts plus the target's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def record(self, k: int, a: int) -> None:
        """Add one round that drafted ``k`` tokens and kept the first ``a``."""
        self.rounds += 1
        self.drafted += k
        self.accepted += a
        while len(self.proposed_at) < k:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for j in range(k):
            self.proposed_at[j] += 1
            self.accepted_at[j] += j < a


@dataclass
class SpeculativeResult:
    """The generated ``tokens`` (no prompt, no EOS) and the run's :class:`SpeculativeStats`."""

    tokens: list[int]
    stats: SpeculativeStats


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _budget(model: CausalLM, prompt_ids: list[int], max_new_tokens: int) -> int:
    """``max_new_tokens`` cut to what the context has left. Errors as :func:`greedy_decode`."""
    ctx = model.config.max_position_embeddings
    if not prompt_ids:
        raise PromptTooLongError("the prompt is empty (no tokens); pass some text or a BOS token")
    if len(prompt_ids) >= ctx:
        raise PromptTooLongError(
            f"the prompt is {len(prompt_ids)} tokens, but the model's context is {ctx} tokens "
            "(max_position_embeddings); shorten the prompt"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return min(max_new_tokens, ctx - len(prompt_ids))


def _argmax(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def _probs(logits: torch.Tensor, params: SamplingParams, vocab: int) -> torch.Tensor:
    """``(..., V')`` logits -> ``(..., vocab)`` fp32 probabilities after temperature, top-k,
    top-p and min-p (zero past a smaller draft vocabulary)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    probs = filter_logits(flat, params).softmax(-1)
    if probs.shape[-1] < vocab:
        probs = torch.nn.functional.pad(probs, (0, vocab - probs.shape[-1]))
    return probs.reshape(*logits.shape[:-1], vocab)


def accept_reject(
    p: torch.Tensor,
    q: torch.Tensor,
    drafts: list[int],
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The speculative sampling rule (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023):
    keep draft ``j`` with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection
    sample from ``norm(max(0, p_j - q_j))``; if all ``k`` are kept, sample from ``p_k``. The
    kept tokens plus the sampled one are distributed exactly as the target samples them.

    Args:
        p: ``(k + 1, V)`` target probabilities at each draft position and one past.
        q: ``(k, V)`` draft probabilities the drafts were sampled from.
        drafts: the ``k`` draft tokens.
        generator: RNG (seeded for reproducible runs).

    Returns:
        ``(a, token)``: the number of kept drafts and the token that follows them.
    """
    k = len(drafts)
    for j, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[j, d]) < float(p[j, d]):  # u < p/q without dividing by a tiny q
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any p-sample is right
            residual = p[j]
        tok = torch.multinomial(residual / residual.sum(), 1, generator=generator)
        return j, int(tok)
    return k, int(torch.multinomial(p[k], 1, generator=generator))


@torch.inference_mode()
def greedy_decode(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """Plain greedy decoding, one target forward per token (the reference speculative decoding
    must equal; the same prefill / decode steps :func:`~deepwhale.inference.generate.generate_stream`
    runs at ``temperature=0``).

    Args:
        model: the target model.
        prompt_ids: prompt token ids (at least one).
        max_new_tokens: budget, cut to ``max_position_embeddings - len(prompt_ids)``.
        eos_token_ids: stop before any of these (not included in the output).

    Returns:
        The generated token ids.

    Raises:
        PromptTooLongError: an empty prompt, or one that fills the context.
        ValueError: ``max_new_tokens < 1``.
    """
    budget = _budget(model, prompt_ids, max_new_tokens)
    device, dtype = _device_dtype(model)
    caches = make_cache(model.config, 1, len(prompt_ids) + budget, dtype=dtype, device=device)
    logits = prefill(model, torch.tensor([prompt_ids], device=device), caches)
    out: list[int] = []
    for step in range(budget):
        token = int(logits[0].argmax())
        if token in eos_token_ids:
            break
        out.append(token)
        if step == budget - 1:
            break
        tok = torch.tensor([[token]], device=device)
        logits = decode_one_token(model, tok, len(prompt_ids) + step, caches)
    return out


def truncated_draft(target: CausalLM, num_layers: int) -> CausalLM:
    """An early-exit draft that shares the target's weights: its embedding, first ``num_layers``
    decoder layers, final norm and ``lm_head`` (self-speculative decoding by layer skipping,
    Zhang et al. 2023, arXiv:2309.08168; Elhoushi et al. 2024, LayerSkip, arXiv:2404.16710).
    No tensor is copied; the draft has its own cache, so the target's is untouched.

    Raises:
        ValueError: ``num_layers`` outside ``1 .. num_hidden_layers - 1``.
    """
    n = target.config.num_hidden_layers
    if not isinstance(num_layers, int) or not 1 <= num_layers < n:
        raise ValueError(
            f"num_layers must be in 1..{n - 1} for a {n}-layer target, got {num_layers}"
        )
    config = dataclasses.replace(target.config, num_hidden_layers=num_layers)
    if config.mlp_layer_types is not None:
        config = dataclasses.replace(config, mlp_layer_types=config.mlp_layer_types[:num_layers])
    with torch.device("meta"):
        draft = CausalLM(config)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(target.model.layers[:num_layers])
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    return draft.eval()


class ModelDrafter:
    """A separate draft model with its own cache.

    Args:
        draft: a :class:`CausalLM` sharing the target's tokenizer (``vocab_size`` may be smaller:
            a draft can only propose ids it has).
        max_seq_len: cache length, tokens (prompt plus budget).

    Raises:
        ValueError: the draft's context is shorter than ``max_seq_len``.
    """

    def __init__(self, draft: CausalLM, max_seq_len: int) -> None:
        if draft.config.max_position_embeddings < max_seq_len:
            raise ValueError(
                f"the draft model's context ({draft.config.max_position_embeddings} tokens) is "
                f"shorter than the {max_seq_len} tokens this generation needs"
            )
        device, dtype = _device_dtype(draft)
        self.model = draft
        self.caches = make_cache(draft.config, 1, max_seq_len, dtype=dtype, device=device)
        self.device = device
        self.fed: list[
            int
        ] = []  # the tokens whose keys the draft cache holds, position by position

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """Target hidden states are not used by a separate draft model."""

    def propose(self, tokens: list[int], k: int, choose=None) -> list[int]:
        """Draft ``k`` tokens after ``tokens`` (the committed sequence, its last token not yet in
        the target's cache). Feeds the draft what it has not seen, then ``k - 1`` drafts.

        ``choose(logits (V,)) -> token`` picks each draft token (default argmax); the logits of
        each draft step are kept in ``self.logits`` (``k`` rows) for the rejection rule."""
        choose = choose or _argmax
        self.logits = []
        p = 0
        limit = min(len(self.fed), len(tokens))
        while p < limit and self.fed[p] == tokens[p]:
            p += 1
        p = min(p, len(tokens) - 1)  # feed at least the newest token (its logits are needed)
        new = tokens[p:]
        pos = torch.arange(p, len(tokens), device=self.device)[None]
        ids = torch.tensor([new], device=self.device)
        logits = self.model(ids, positions=pos, caches=self.caches, last_only=True)[:, -1]
        self.logits.append(logits[0])
        drafts = [choose(logits[0])]
        for j in range(1, k):
            tok = torch.tensor([[drafts[-1]]], device=self.device)
            logits = decode_one_token(self.model, tok, len(tokens) + j - 1, self.caches)
            self.logits.append(logits[0])
            drafts.append(choose(logits[0]))
        self.fed = tokens + drafts[:-1]
        return drafts


class MTPDrafter:
    """DeepSeek-V3's MTP module as the draft (see the module docstring).

    Args:
        target: a :class:`CausalLM` loaded with ``load_mtp=True`` (it has ``target.mtp``).
        max_seq_len: cache length, tokens.

    Raises:
        ValueError: the target has no MTP module.
    """

    def __init__(self, target: CausalLM, max_seq_len: int) -> None:
        mtp = getattr(target, "mtp", None)
        if mtp is None:
            raise ValueError(
                "the target model has no MTP module: load it with load_mtp=True (a DeepSeek-V3 "
                "checkpoint with num_nextn_predict_layers >= 1), or pass a draft model"
            )
        device, dtype = _device_dtype(target)
        self.mtp = mtp
        self.cache = make_mtp_cache(mtp.config, 1, max_seq_len, dtype=dtype, device=device)[0]
        self.device = device
        self.hidden: torch.Tensor | None = None  # (1, T, H) target states not yet fed to the MTP
        self.start = 0  # position of hidden[:, 0]

    def observe(self, hidden: torch.Tensor, start: int) -> None:
        """Take the target's final hidden states ``(1, T, H)`` of committed positions
        ``start .. start + T - 1`` (their next tokens are committed too)."""
        self.hidden, self.start = hidden, start

    def propose(self, tokens: list[int], k: int, choose=None) -> list[int]:
        """Draft ``k`` tokens after ``tokens``: the MTP module over the observed positions (their
        next tokens ``t_{i+1}`` as input), then ``k - 1`` chained steps. ``choose`` and
        ``self.logits`` as :meth:`ModelDrafter.propose`."""
        choose = choose or _argmax
        self.logits = []
        if self.hidden is None:
            raise RuntimeError("MTPDrafter.propose before observe: no target hidden states")
        s, t = self.start, self.hidden.shape[1]
        if s + t != len(tokens) - 1:
            raise RuntimeError(
                f"the observed hidden states end at position {s + t - 1}, expected "
                f"{len(tokens) - 2}"
            )
        ids = torch.tensor([tokens[s + 1 :]], device=self.device)
        pos = torch.arange(s, s + t, device=self.device)[None]
        g, logits = self.mtp(ids, self.hidden, pos, self.cache)
        self.logits.append(logits[0, -1])
        drafts = [choose(logits[0, -1])]
        g = g[:, -1:]
        for j in range(1, k):
            tok = torch.tensor([[drafts[-1]]], device=self.device)
            pos = torch.full((1, 1), s + t - 1 + j, device=self.device)
            g, logits = self.mtp(tok, g, pos, self.cache)
            self.logits.append(logits[0, -1])
            drafts.append(choose(logits[0, -1]))
        self.hidden = None
        return drafts


@torch.inference_mode()
def speculative_decode(
    target: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft: CausalLM | str = "mtp",
    k: int = 4,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    params: SamplingParams | None = None,
) -> SpeculativeResult:
    """Speculative decoding of one sequence: greedy by default, sampled with ``params``.

    Args:
        target: the model whose output is produced.
        prompt_ids: prompt token ids (at least one).
        max_new_tokens: budget, cut to ``max_position_embeddings - len(prompt_ids)``.
        draft: ``"mtp"`` (the target's MTP module, loaded with ``load_mtp=True``) or a
            separate draft :class:`CausalLM` with the same tokenizer.
        k: draft tokens per round (the last round drafts fewer when the budget is nearly used).
        eos_token_ids: stop before any of these (not included in the output).
        params: None or greedy settings (``temperature=0``): greedy, token-identical to
            :func:`greedy_decode`. Otherwise draft and target both sample with its temperature,
            top-k, top-p and min-p, and :func:`accept_reject` keeps the output distributed as the
            target alone would sample it; ``seed`` makes the run reproducible. Its
            ``max_new_tokens``, ``stop`` and ``ignore_eos`` are not read here.

    Returns:
        :class:`SpeculativeResult`: the tokens and the counters.

    Raises:
        PromptTooLongError: an empty prompt, or one that fills the context.
        ValueError: ``k < 1``, ``max_new_tokens < 1``, an unknown ``draft`` string, a target
            without an MTP module for ``"mtp"``, a draft whose vocabulary is larger than the
            target's or whose context is too short, or repetition / presence / frequency
            penalties in ``params`` (they depend on the history, not supported here).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
    sampled = params is not None and not params.greedy
    if sampled and (
        params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty
    ):
        raise ValueError(
            "speculative sampling does not apply repetition, presence or frequency penalties; "
            "leave them at their defaults"
        )
    budget = _budget(target, prompt_ids, max_new_tokens)
    max_len = len(prompt_ids) + budget
    if isinstance(draft, str):
        if draft != "mtp":
            raise ValueError(f"draft must be 'mtp' or a CausalLM, got {draft!r}")
        drafter: ModelDrafter | MTPDrafter = MTPDrafter(target, max_len)
    else:
        if draft.config.vocab_size > target.config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.config.vocab_size}) is larger than the target's "
                f"({target.config.vocab_size}); they must share a tokenizer"
            )
        drafter = ModelDrafter(draft, max_len)
    device, dtype = _device_dtype(target)
    vocab = target.config.vocab_size
    generator = params.make_generator(device) if sampled else None

    def choose(logits: torch.Tensor) -> int:  # one token from (V,) logits
        if not sampled:
            return int(logits.argmax())
        probs = _probs(logits, params, vocab)
        return int(torch.multinomial(probs, 1, generator=generator))

    caches = make_cache(target.config, 1, max_len, dtype=dtype, device=device)
    stats = SpeculativeStats()
    h = target.hidden_states(torch.tensor([prompt_ids], device=device), caches=caches)
    first = choose(target.lm_head(h[:, -1])[0])
    if first in eos_token_ids:
        return SpeculativeResult([], stats)
    tokens = list(prompt_ids) + [first]
    out = [first]
    drafter.observe(h, 0)
    while len(out) < budget:
        n = len(tokens) - 1  # position of the newest token, not in the target's cache yet
        k_round = min(k, budget - len(out))
        drafts = drafter.propose(tokens, k_round, choose)
        ids = torch.tensor([[tokens[-1], *drafts]], device=device)
        pos = torch.arange(n, n + k_round + 1, device=device)[None]
        h = target.hidden_states(ids, positions=pos, caches=caches)  # (1, k+1, H)
        logits = target.lm_head(h)[0]  # (k+1, V): the target's next-token logits after each
        if sampled:
            q = _probs(torch.stack(drafter.logits), params, vocab)
            a, nxt = accept_reject(_probs(logits, params, vocab), q, drafts, generator)
        else:
            best = logits.argmax(-1).tolist()
            a = 0
            while a < k_round and drafts[a] == best[a]:
                a += 1
            nxt = best[a]
        stats.record(k_round, a)
        new = drafts[:a] + [nxt]
        for j, tok in enumerate(new):
            if tok in eos_token_ids:
                return SpeculativeResult((out + new[:j])[:budget], stats)
        out += new
        tokens += new
        drafter.observe(h[:, : a + 1], n)
    return SpeculativeResult(out[:budget], stats)
