"""DeepSeekMoE load balancing for training: auxiliary balance loss and the bias update.

The model stays inference code: :class:`RouterMonitor` attaches forward hooks to every
:class:`~deepwhale.model.moe.Gate` and reads what the gate already returns, ``(weights, indices,
scores)``. Nothing in the model changes, and without a monitor nothing is recorded.

* Auxiliary balance loss, DeepSeek-V2 §2.2.3 (expert-level balance loss) and DeepSeek-V3 §2.1.2
  eq. 17-20 (complementary sequence-wise balance loss): per MoE layer
  ``L = alpha * sum_i f_i * P_i`` with ``f_i = E / (K * T) * #{t : expert i in top-K(t)}`` and
  ``P_i = mean_t s'_{i,t}``; ``s'`` are the router scores, normalised to sum to one per token for
  sigmoid routers (V3 eq. 19). With ``seq_aux`` the statistics are taken per sequence and the
  losses summed over sequences (the trainer divides by the sequences in the accumulation window);
  otherwise over the whole micro-batch (as transformers' DeepSeek-V2 port does).
* Auxiliary-loss-free balancing, DeepSeek-V3 §2.1.2: after each optimizer step,
  ``e_score_correction_bias += gamma * sign(mean_load - load)`` per ``noaux_tc`` layer, where
  ``load`` counts the tokens routed to each expert over the step. Done under ``no_grad``; the bias
  only steers the top-k choice.
"""

from __future__ import annotations

import torch
from torch import nn

from deepwhale.model.moe import Gate


class RouterMonitor:
    """Records router outputs of every MoE layer during the forward passes of one micro-batch.

    Args:
        model: the model (a :class:`~deepwhale.model.transformer.CausalLM`, possibly wrapped by
            PEFT); every :class:`Gate` inside gets a forward hook.
        record_scores: keep the ``(N, E)`` scores with their autograd graph (for the aux loss).

    Use :meth:`clear` before a micro-batch, then :meth:`aux_loss` and :meth:`add_loads` after its
    forward pass. :meth:`remove` detaches the hooks.
    """

    def __init__(self, model: nn.Module, record_scores: bool = True) -> None:
        self.gates: list[Gate] = [m for m in model.modules() if isinstance(m, Gate)]
        self.record_scores = record_scores
        self.enabled = True
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loads = [torch.zeros(g.n_experts, dtype=torch.float64) for g in self.gates]
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i: int):
        def hook(module, args, output):
            if self.enabled:
                _, indices, scores = output
                self._outputs[i] = (indices, scores if self.record_scores else None)

        return hook

    def clear(self) -> None:
        """Forget the outputs of the last forward pass."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def aux_loss(self, mask: torch.Tensor, alpha: float, seq_aux: bool) -> torch.Tensor:
        """Balance loss summed over MoE layers for the last forward pass.

        Args:
            mask: ``(B, T)`` bool, True on real (non-padding) input tokens.
            alpha: the loss weight.
            seq_aux: per-sequence statistics (summed over the ``B`` sequences) or micro-batch-wide.

        Returns:
            A scalar fp32 tensor (0 when there are no MoE layers).
        """
        total = torch.zeros((), device=mask.device)
        for i in sorted(self._outputs):
            total = total + self.layer_balance_term(i, mask, seq_aux)
        return alpha * total

    def layer_balance_term(self, i: int, mask: torch.Tensor, seq_aux: bool) -> torch.Tensor:
        """``sum_i f_i * P_i`` (summed over sequences with ``seq_aux``) of MoE layer ``i`` for
        its last forward pass, without the ``alpha`` weight; ``mask`` as in :meth:`aux_loss`."""
        indices, scores = self._outputs[i]
        b, t = mask.shape
        m = mask.reshape(b, t, 1).float()
        gate = self.gates[i]
        e, k = gate.n_experts, gate.top_k
        s = scores
        if gate.scoring_func == "sigmoid":
            s = s / (s.sum(dim=-1, keepdim=True) + 1e-20)  # V3 eq. 19
        s = s.view(b, t, e)  # (B, T, E)
        hits = torch.zeros(b * t, e, device=s.device).scatter_add_(
            1, indices, torch.ones_like(indices, dtype=torch.float32)
        )
        hits = hits.view(b, t, e) * m  # (B, T, E), padding removed
        if seq_aux:
            n_tok = m.sum(dim=1).clamp(min=1)  # (B, 1)
            f = hits.sum(dim=1) * e / (k * n_tok)  # (B, E)
            p = (s * m).sum(dim=1) / n_tok  # (B, E)
        else:
            n_tok = m.sum().clamp(min=1)
            f = hits.sum(dim=(0, 1)) * e / (k * n_tok)  # (E,)
            p = (s * m).sum(dim=(0, 1)) / n_tok
        return (f * p).sum()

    def add_loads(self, mask: torch.Tensor) -> None:
        """Add the last forward pass's per-expert token counts (real tokens only) to :attr:`loads`."""
        for i, (indices, _) in self._outputs.items():
            k = indices.shape[-1]
            real = mask.reshape(-1, 1).expand(-1, k).reshape(-1).to(indices.device, torch.float64)
            # a weighted bincount instead of boolean indexing: no device-to-host sync
            counts = torch.bincount(
                indices.flatten(), weights=real, minlength=self.gates[i].n_experts
            )
            if self.loads[i].device != counts.device:  # stays on the model's device
                self.loads[i] = self.loads[i].to(counts.device)
            self.loads[i] += counts

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """DeepSeek-V3 §2.1.2: ``b_i += gamma * sign(mean_load - load_i)`` for every ``noaux_tc``
        gate, from the loads accumulated since the last call; then reset the loads.

        Returns:
            The mean over layers of ``max_load / mean_load`` (1.0 = perfectly balanced), for
            logs, as a 0-d tensor on the model's device (reading it syncs; the trainer does that
            once per step).
        """
        ratios = []
        for gate, load in zip(self.gates, self.loads, strict=True):
            mean = load.mean()
            ratios.append(torch.where(mean > 0, load.max() / mean.clamp(min=1e-9), 1.0))
            bias = gate.e_score_correction_bias
            if bias is not None and gamma > 0:  # sign(0) = 0: no tokens, no change
                step = torch.sign(mean - load).to(bias.device, bias.dtype)
                bias.add_(gamma * step)
            load.zero_()
        return torch.stack(ratios).float().mean() if ratios else torch.ones(())
