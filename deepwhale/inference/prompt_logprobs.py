"""Teacher-forced log-probabilities of a prompt's own tokens (``echo`` with ``logprobs``).

OpenAI's legacy Completions API, with ``echo: true`` and ``logprobs: k``, returns for every prompt
token the log-probability the model gave it after the tokens before it, plus the ``k`` most likely
alternatives at that position. The first token has no context, so its entries are ``null``
(OpenAI's and vLLM's behaviour). lm-evaluation-harness's ``local-completions`` backend scores
log-likelihood tasks this way: it sends context + continuation with ``echo`` and sums the
continuation's entries (lm-eval 0.4.x ``LocalCompletionsAPI.parse_logprobs``).

The values come from one causal forward over the whole prompt (no KV cache), in float32
``log_softmax``, the same arithmetic as :func:`deepwhale.eval.scoring.score_requests` and the
engine's generated-token logprobs.
"""

from __future__ import annotations

import torch

from deepwhale.inference.generate import TokenLogprob

#: Rows of the forward pass at a time: bounds the (rows, vocab) logits tensor.
CHUNK = 256


def prompt_logprobs(
    module: torch.nn.Module, prompt_ids: list[int], top_n: int = 0
) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the tokens before it.

    Args:
        module: a :class:`~deepwhale.model.transformer.CausalLM` (``model`` + ``lm_head``).
        prompt_ids: the prompt, ``T`` token ids, ``T >= 1``; it must fit the model's context
            (the caller checks ``max_seq_len``).
        top_n: how many most likely alternatives to report per position (0-20).

    Returns:
        ``T`` entries: ``None`` for the first token, then ``TokenLogprob(token, logprob, top)``
        with natural-log values and ``top`` the ``top_n`` best ``(token_id, logprob)``, best first.

    Raises:
        ValueError: an empty prompt, ``top_n`` outside 0..20, or a token id outside the vocabulary.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty (no tokens)")
    if not 0 <= top_n <= 20:
        raise ValueError(f"logprobs must be in 0..20, got {top_n}")
    vocab = module.lm_head.weight.shape[0]
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    out: list[TokenLogprob | None] = [None]
    if len(prompt_ids) == 1:
        return out
    device = next(module.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    positions = torch.arange(len(prompt_ids), device=device)[None]  # (1, T)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            hidden = module.model(ids, positions)[0, :-1]  # (T-1, H): predicts tokens 1..T-1
            targets = ids[0, 1:]  # (T-1,)
            for start in range(0, hidden.shape[0], CHUNK):
                h = hidden[start : start + CHUNK]
                logp = torch.log_softmax(module.lm_head(h).float(), dim=-1)  # (C, V)
                tgt = targets[start : start + CHUNK]
                picked = logp.gather(1, tgt[:, None])[:, 0].tolist()  # (C,)
                if top_n:
                    vals, idx = logp.topk(top_n, dim=-1)  # (C, top_n)
                    tops = [
                        list(zip(i, v, strict=True))
                        for i, v in zip(idx.tolist(), vals.tolist(), strict=True)
                    ]
                else:
                    tops = [[] for _ in picked]
                out.extend(
                    TokenLogprob(t, lp, top)
                    for t, lp, top in zip(tgt.tolist(), picked, tops, strict=True)
                )
    finally:
        module.train(was_training)
    return out
