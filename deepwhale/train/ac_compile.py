"""Activation checkpointing and ``torch.compile`` of the decoder layers, applied from outside.

Both work per :class:`~deepwhale.model.transformer.DecoderLayer` and keep every parameter's name
(so checkpoints, the optimizer, LoRA adapters and DCP resharding see the same FQNs as without
them). The parallel trainer applies them between its plans in torchtitan's order
(TP -> EP -> activation checkpointing -> compile -> FSDP2/DDP); one process applies them alone.

* **Activation checkpointing** (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
  Megatron-LM's full recompute, Korthikanti et al. 2022 §4): a checkpointed layer keeps only its
  input; backward runs its forward again (``torch.utils.checkpoint``, non-reentrant) to rebuild
  the activations it needs. ``full`` checkpoints every ``every``-th layer (``every=1``: all).
  Recompute replays the same operations on the same inputs with the same RNG state, so losses
  and gradients are bitwise those of the run without it on a deterministic backend (CPU); only
  memory and time change. Collectives inside a layer (TP's redistributions, EP's all-to-all)
  run again during recompute, as in Megatron-LM.
  Training code that keeps statistics from forward hooks asks :func:`is_recomputing` so the
  replayed forward is not counted twice.
* **Compile** (``torch.compile``, PyTorch 2 paper, Ansel et al. ASPLOS 2024): each decoder layer
  is compiled in place (``nn.Module.compile``: same module, same names) with the chosen backend;
  the layers share one compiled graph when their shapes match. Graph breaks (the MoE's
  data-dependent routing) fall back to eager for that part, as torchtitan's per-block compile
  does. Under checkpointing, dynamo traces the recompute region itself.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full")

_recompute_depth = 0


def is_recomputing() -> bool:
    """True while backward replays a checkpointed layer's forward (eager mode)."""
    return _recompute_depth > 0


@contextlib.contextmanager
def _recomputing():
    global _recompute_depth
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1


def _contexts():
    return contextlib.nullcontext(), _recomputing()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The :class:`~deepwhale.model.transformer.DecoderLayer` modules of ``model`` in order (a
    whole model, a PEFT-wrapped one or one pipeline stage)."""
    from deepwhale.model.transformer import DecoderLayer

    return [m for m in model.modules() if isinstance(m, DecoderLayer)]


def apply_activation_checkpointing(
    model: nn.Module, mode: str = "full", every: int = 1, compiled: bool = False
) -> int:
    """Checkpoint the decoder layers of ``model`` in place.

    Args:
        model: holds :class:`DecoderLayer` modules; their ``forward`` is wrapped, nothing is
            renamed. Shapes are unchanged: ``(B, T, H) -> (B, T, H)`` per layer.
        mode: ``none`` (no-op) or ``full``.
        every: checkpoint layer ``i`` (counted within ``model``) when ``i % every == 0``.
        compiled: the layers will be compiled: use plain non-reentrant checkpointing (dynamo
            traces it as one region), without the :func:`is_recomputing` marker.

    Returns:
        The number of layers checkpointed.

    Raises:
        ValueError: an unknown ``mode`` or ``every < 1``.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing: {mode!r} is not one of {', '.join(AC_MODES)}")
    if every < 1:
        raise ValueError(f"ac_every: must be >= 1, got {every}")
    if mode == "none":
        return 0
    n = 0
    for i, layer in enumerate(decoder_layers(model)):
        if i % every:
            continue
        inner = layer.forward
        kwargs = {} if compiled else {"context_fn": _contexts}

        @functools.wraps(inner)
        def forward(*args, _inner=inner, _kw=kwargs, **kw):
            if not torch.is_grad_enabled():  # evaluation: nothing to save
                return _inner(*args, **kw)
            return checkpoint(_inner, *args, use_reentrant=False, **_kw, **kw)

        layer.forward = forward
        n += 1
    return n


def saved_activation_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward of ``model`` on ``input_ids`` ``(B, T)``
    (measured with ``torch.autograd.graph.saved_tensors_hooks``). A checkpointed layer's own
    saved tensors go through checkpoint's inner hooks and are dropped, so only its input and
    what lies outside checkpointed layers count. Eager models only: a compiled graph saves what
    AOTAutograd's partitioner picks."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids).float().sum()
    return total


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer of ``model`` in place (``nn.Module.compile``).

    Args:
        model: holds :class:`DecoderLayer` modules.
        backend: a ``torch.compile`` backend (``inductor``; ``aot_eager`` traces forward and
            backward without generating code, for checks).

    Returns:
        The number of layers compiled.

    Raises:
        ValueError: ``backend`` is not one torch knows (the message lists them).
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        usual = sorted(set(torch._dynamo.list_backends()) | {"aot_eager", "eager"})
        raise ValueError(
            f"compile_backend: {backend!r} is not a torch.compile backend; e.g. {', '.join(usual)}"
        )
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
