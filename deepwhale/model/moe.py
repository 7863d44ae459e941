"""DeepSeekMoE: a router over fine-grained routed experts plus always-active shared experts.

References: DeepSeek-V2 (arXiv:2405.04434) §2.2 — softmax scores, ``greedy`` and device/group
limited ``group_limited_greedy`` top-k; DeepSeek-V3 (arXiv:2412.19437) §2.1.2 — sigmoid scores,
``noaux_tc`` selection on scores plus a per-expert bias ``e_score_correction_bias`` that only steers
selection (the gate weights come from the unbiased scores), groups scored by their top-2 experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import MLP


class Gate(nn.Module):
    """Top-k router. Attribute names mirror HF keys: ``weight`` ``(E, H)`` and, for ``noaux_tc``,
    the buffer ``e_score_correction_bias`` ``(E,)``.

    ``forward(x)`` takes ``(N, H)`` tokens and returns ``(weights, indices, scores)``:
    ``(N, k)`` fp32 gate weights, ``(N, k)`` expert ids, and the ``(N, E)`` fp32 scores (for the
    auxiliary balance loss).

    Weights follow each generation's reference code: DeepSeek-V2 renormalises the top-k weights
    when ``norm_topk_prob`` and ``k > 1`` and otherwise multiplies them by
    ``routed_scaling_factor`` (never both; transformers' V2 port ignores ``norm_topk_prob``, which
    agrees for every released V2 config, all of which set it false); DeepSeek-V3 renormalises when
    ``norm_topk_prob`` (for any k) and then multiplies by ``routed_scaling_factor``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        # DeepSeek-V2's reference gate renormalises *or* scales; V3's renormalises, then scales
        self.normalize_or_scale = config.model_type == "deepseek_v2"
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.float()
        if self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
                fill = float("-inf")
            else:
                group_scores = grouped.amax(dim=-1)
                fill = 0.0
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.n_experts)
            choice = choice.masked_fill(~expert_mask, fill)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, indices)
        if self.normalize_or_scale:  # DeepSeek-V2 modeling code: normalise if k > 1, else scale
            if self.norm_topk_prob and self.top_k > 1:
                return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), indices, scores
            return weights * self.routed_scaling_factor, indices, scores
        if self.norm_topk_prob:  # DeepSeek-V3 (inference/model.py, transformers): any k
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class MoE(nn.Module):
    """Routed experts (``experts.{j}``, each a SwiGLU :class:`MLP` of ``moe_intermediate_size``),
    a :class:`Gate`, and ``shared_experts`` (one MLP of ``n_shared_experts * moe_intermediate_size``).

    Shapes: ``(B, T, H) -> (B, T, H)``. The expert loop visits only experts that received tokens.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = Gate(config)
        self.experts = nn.ModuleList(MLP(h, inter) for _ in range(config.n_routed_experts))
        self.shared_experts = (
            MLP(h, inter * config.n_shared_experts) if config.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        weights, indices, _ = self.gate(flat)  # (N, k)
        out = torch.zeros_like(flat)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            token, slot = torch.where(indices == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
