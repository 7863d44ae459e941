"""MoE balancing: the auxiliary loss against DeepSeek-V2's reference formula, the V3 bias update."""

from __future__ import annotations

import torch

from deepwhale.model.flavours import flavour_config
from deepwhale.model.transformer import CausalLM
from deepwhale.train.moe import RouterMonitor


def _reference_aux(scores, idx, b, t, e, k, alpha, seq_aux):
    """DeepSeek-V2's MoEGate auxiliary loss (modeling_deepseek.py), batch mean over sequences."""
    idx = idx.view(b, -1)
    if seq_aux:
        ce = torch.zeros(b, e).scatter_add_(1, idx, torch.ones(b, t * k)).div_(t * k / e)
        return (ce * scores.view(b, t, e).mean(dim=1)).sum(dim=1).mean() * alpha
    ce = torch.nn.functional.one_hot(idx.view(-1), num_classes=e).float().mean(0)
    return (scores.mean(0) * ce * e).sum() * alpha


def test_aux_loss_matches_reference_and_ignores_padding():
    torch.manual_seed(0)
    model = CausalLM(flavour_config("debug-v2"))  # softmax router, 8 experts, top-2
    model.init_weights(std=0.3)
    mon = RouterMonitor(model)
    b, t = 3, 7
    x = torch.randint(0, 512, (b, t))
    model(x)
    (idx, scores) = mon._outputs[0]
    mask = torch.ones(b, t, dtype=torch.bool)
    for seq_aux in (True, False):
        ours = mon.aux_loss(mask, 0.1, seq_aux)
        ref = _reference_aux(scores, idx, b, t, 8, 2, 0.1, seq_aux)
        if seq_aux:
            ours = ours / b  # the trainer divides by the sequences in the window
        torch.testing.assert_close(ours, ref)
    # padding: appending pad positions to a sequence leaves its (per-sequence) loss unchanged
    mon.clear()
    model(x[:1])
    alone = mon.aux_loss(torch.ones(1, t, dtype=torch.bool), 0.1, True)
    mon.clear()
    padded = torch.cat([x[:1], torch.zeros(1, 4, dtype=torch.long)], dim=1)
    model(padded)
    m = torch.zeros(1, t + 4, dtype=torch.bool)
    m[:, :t] = True
    torch.testing.assert_close(mon.aux_loss(m, 0.1, True), alone)
    mon.enabled = False
    mon.clear()
    model(x)
    assert not mon._outputs
    mon.remove()
    model(x)
    assert not mon._outputs


def test_bias_update_follows_the_load_sign():
    model = CausalLM(flavour_config("debug-v3"))  # sigmoid noaux_tc router
    model.init_weights()
    mon = RouterMonitor(model, record_scores=False)
    model(torch.randint(0, 512, (2, 9)))
    mon.add_loads(torch.ones(2, 9, dtype=torch.bool))
    loads = [load.clone() for load in mon.loads]
    assert all(float(load.sum()) == 2 * 9 * 2 for load in loads)
    imbalance = mon.update_bias(0.01)
    assert imbalance >= 1.0
    for gate, load in zip(mon.gates, loads, strict=True):
        want = 0.01 * torch.sign(load.mean() - load).float()
        torch.testing.assert_close(gate.e_score_correction_bias, want)
    assert all(float(load.sum()) == 0 for load in mon.loads)  # reset
    assert mon.update_bias(0.01) == 1.0  # nothing recorded: no change
