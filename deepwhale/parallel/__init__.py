"""Distributed training on torch.distributed: layouts, device meshes and the DP/TP/PP/EP plans.

The model code in :mod:`deepwhale.model` stays single-device; everything here is applied to it
from outside, in torchtitan's order (TP -> EP -> activation checkpointing -> compile -> FSDP2/DDP).
:mod:`deepwhale.parallel.layout` and :mod:`deepwhale.parallel.planner` import no torch.
"""
