"""INT8 quantization as a model-to-model transform: ``quantize_model(CausalLM, mode) -> CausalLM``.

Two modes, both with int8 weights and one fp32 scale per output channel (symmetric absmax,
``scale = max|W[o, :]| / 127``, values in ``[-127, 127]``):

* ``"int8"``: weight-only (W8A16-style). Activations stay in the model's float dtype; the int8
  weight is multiplied in with its scale (gpt-fast ``quantize.py`` ``WeightOnlyInt8Linear``;
  torchao ``Int8WeightOnlyConfig``).
* ``"int8-dynamic"``: W8A8. Each activation row (token) is quantized on the fly to int8 with its
  own absmax scale, multiplied in int8 with int32 accumulation, and rescaled by
  ``row_scale * channel_scale`` (the vector-wise scheme of LLM.int8(), Dettmers et al.
  arXiv:2208.07339 §3, without its fp16 outlier path; torchao
  ``Int8DynamicActivationInt8WeightConfig``).

Every ``nn.Linear`` of attention and MLP / experts becomes an :class:`Int8Linear`. Embeddings,
norms, the MoE router (``mlp.gate``, a parameter, not a Linear), DeepSeek-V3.2's lightning indexer
(``self_attn.indexer``: its top-k choice is a hard selection that int8 rounding would flip) and,
by default, ``lm_head`` stay in float. The module keeps its forward signature, so the generation code runs it unchanged, and
remembers its mode in ``module.quantization``.

Kernels: an :class:`Int8Linear` stores only ``weight`` (int8) and ``weight_scale`` (fp32); the
matrix multiply is one of the maintained PyTorch ops in :data:`KERNELS`, picked per device from
:data:`KERNEL_ORDER`. A kernel that is missing or broken in the installed PyTorch (probed once per
process) is skipped with a ``RuntimeWarning`` naming it and the next one is used; every list ends
in a pure-ATen kernel with the same numerics contract (int8 weights, and int8 activations in
``int8-dynamic``), so a removed API makes the model slower, never silently fp32.

Which kernel each device uses, the measured speed of every candidate, weight bytes and the
perplexity ratios are in ``docs/int8.md`` (measured with ``benchmarks/int8_candidates.py``).
Quantized checkpoints are read and written by :mod:`deepwhale.checkpoint.quantized`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepwhale.checkpoint.hub import CheckpointError
from deepwhale.checkpoint.io import checkpoint_files
from deepwhale.checkpoint.quantized import (  # noqa: F401  (re-exported)
    MODES,
    QUANT_METHOD,
    SCALE_SUFFIX,
    is_quantized_checkpoint,
    quantization_config,
    read_quantization_config,
    read_quantized_state,
    save_quantized,
)
from deepwhale.model.config import ModelConfig
from deepwhale.model.layers import RotaryEmbedding
from deepwhale.model.transformer import CausalLM

_EPS = 1e-8  # smallest absmax before dividing by it (all-zero rows and tokens)
_CUDA_INT_MM_MIN_ROWS = 17  # cuBLAS int8 GEMM in torch._int_mm wants more than 16 rows


# ---------------------------------------------------------------------------- quantizers
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantization of a linear weight.

    Args:
        weight: ``(out_features, in_features)`` float weight (any float dtype; math in fp32).

    Returns:
        ``(q, scale)``: ``q`` int8 ``(out, in)`` in ``[-127, 127]``, ``scale`` fp32 ``(out,)`` with
        ``weight ~= q * scale[:, None]`` (gpt-fast ``dynamically_quantize_per_channel``, symmetric).

    Raises:
        ValueError: ``weight`` is not 2-D.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row (per-token) int8 quantization of activations.

    Args:
        x: ``(N, K)`` float activations.

    Returns:
        ``(xq, scale)``: int8 ``(N, K)`` in ``[-127, 127]`` and fp32 ``(N, 1)``,
        ``x ~= xq * scale`` (LLM.int8() vector-wise absmax quantization).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / 127  # (N, 1)
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


# ---------------------------------------------------------------------------- kernels
def _dequant(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    # gpt-fast WeightOnlyInt8Linear: F.linear(x, int8 -> x.dtype) * scales
    return F.linear(x, layer.weight.to(x.dtype)) * layer.weight_scale.to(x.dtype)


def _weight_int8pack_mm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.contiguous(), layer.weight, layer.weight_scale.to(x.dtype))


def _dequant_w8a8(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_rows(x)  # (N, K), (N, 1)
    acc = F.linear(xq.float(), layer.weight.float())  # (N, out): int products summed in fp32
    return (acc * xs * layer.weight_scale).to(x.dtype)


def _int_mm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_rows(x)  # (N, K) int8, (N, 1) fp32
    n = xq.shape[0]
    if xq.is_cuda and n < _CUDA_INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, _CUDA_INT_MM_MIN_ROWS - n))
    acc = torch._int_mm(xq, layer.weight.t())[:n]  # (N, out) int32
    return (acc.float() * xs * layer.weight_scale).to(x.dtype)


def _fbgemm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 1:  # fbgemm quantizes a call per tensor: per token only for one row
        return _int_mm(layer, x)
    if layer._packed is None:
        layer._packed = _fbgemm_pack(layer.weight, layer.weight_scale)
    if x.dtype != torch.float32:
        return torch.ops.quantized.linear_dynamic(x.float(), layer._packed, True).to(x.dtype)
    return torch.ops.quantized.linear_dynamic(x, layer._packed, True)  # reduce_range: 7-bit x


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    """Pack int8 ``(out, in)`` + fp32 ``(out,)`` scales into fbgemm/x86 linear params."""
    with warnings.catch_warnings():  # documented above: the qint8 tensor API is deprecated
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(
            q.cpu(), scale.cpu().double(), torch.zeros(q.shape[0], dtype=torch.long), 0
        )
        return torch.ops.quantized.linear_prepack(qw, None)


def _fits_cuda_int_mm(in_features: int, out_features: int, device_type: str) -> bool:
    return device_type != "cuda" or (in_features % 8 == 0 and out_features % 8 == 0)


def _fits_any(in_features: int, out_features: int, device_type: str) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One way to run an :class:`Int8Linear`.

    Attributes:
        name: the key in :data:`KERNELS` (and the ``kernel=`` argument of :func:`quantize_model`).
        mode: ``"int8"`` or ``"int8-dynamic"``.
        op: the maintained operator it calls.
        devices: device types it supports (``"cpu"``, ``"cuda"``, ...); empty means any.
        run: ``(layer, x (N, in)) -> (N, out)`` in ``x.dtype``, bias not added.
        fits: ``(in_features, out_features, device_type) -> bool``; layers that do not fit use
            the next kernel in :data:`KERNEL_ORDER`.
    """

    name: str
    mode: str
    op: str
    devices: tuple[str, ...]
    run: Callable[[Int8Linear, torch.Tensor], torch.Tensor]
    fits: Callable[[int, int, str], bool] = _fits_any


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel("dequant", "int8", "F.linear(x, W.to(x.dtype)) * scale", (), _dequant),
        Kernel(
            "weight_int8pack_mm",
            "int8",
            "torch._weight_int8pack_mm",
            ("cpu", "cuda", "mps"),
            _weight_int8pack_mm,
        ),
        Kernel(
            "fbgemm",
            "int8-dynamic",
            "torch.ops.quantized.linear_dynamic (one row) + torch._int_mm (more rows)",
            ("cpu",),
            _fbgemm,
        ),
        Kernel(
            "int_mm", "int8-dynamic", "torch._int_mm", ("cpu", "cuda"), _int_mm, _fits_cuda_int_mm
        ),
        Kernel("dequant-w8a8", "int8-dynamic", "F.linear on int8 values", (), _dequant_w8a8),
    )
}

# Fastest first, as measured (module docstring); "*" is any other device type.
KERNEL_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("int8", "cpu"): ("dequant", "weight_int8pack_mm"),
    ("int8", "cuda"): ("dequant", "weight_int8pack_mm"),
    ("int8", "*"): ("dequant",),
    ("int8-dynamic", "cpu"): ("fbgemm", "int_mm", "dequant-w8a8"),
    ("int8-dynamic", "cuda"): ("int_mm", "dequant-w8a8"),
    ("int8-dynamic", "*"): ("dequant-w8a8",),
}


@functools.cache
def _probe(name: str, device: str) -> str | None:
    """Run kernel ``name`` once on a tiny layer on ``device``; None if it works, else the error."""
    kernel = KERNELS[name]
    if kernel.devices and torch.device(device).type not in kernel.devices:
        return f"it does not run on {device}"
    try:
        g = torch.Generator().manual_seed(0)
        layer = Int8Linear.from_linear(_tiny_linear(g), kernel.mode).to(device)
        x = torch.randn(2, 32, generator=g).to(device)
        want = _dequant_w8a8(layer, x) if kernel.mode == "int8-dynamic" else _dequant(layer, x)
        for rows in (x[:1], x):
            got = kernel.run(layer, rows)
            if got.shape != (rows.shape[0], 32) or not torch.allclose(
                got, want[: rows.shape[0]], rtol=0.05, atol=0.05
            ):
                return f"wrong result on a probe ({tuple(got.shape)})"
    except Exception as e:  # a removed or broken op: report it, use the next kernel
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None


def _tiny_linear(g: torch.Generator) -> nn.Linear:
    layer = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 32, generator=g) * 0.1)
    return layer


@functools.cache
def _working_kernels(mode: str, device: str, prefer: str | None) -> tuple[str, ...]:
    """The kernels to try for ``mode`` on ``device``, in order, with broken ones dropped.

    Raises:
        RuntimeError: ``prefer`` was asked for explicitly and does not work here, or no kernel
            works (never happens with ATen present: the last ones are plain ``F.linear``).
    """
    device_type = torch.device(device).type
    order = KERNEL_ORDER.get((mode, device_type), KERNEL_ORDER[(mode, "*")])
    if prefer is not None:
        err = _probe(prefer, device)
        if err is not None:
            raise RuntimeError(f"int8 kernel {prefer!r} does not work on {device}: {err}")
        order = (prefer, *(k for k in order if k != prefer))
    working = []
    for name in order:
        err = _probe(name, device)
        if err is None:
            working.append(name)
        elif not working:  # the preferred one is gone: say so once, use the next
            warnings.warn(
                f"deepwhale {mode}: kernel {name!r} ({KERNELS[name].op}) is unavailable on "
                f"{device} ({err}); falling back to the next candidate",
                RuntimeWarning,
                stacklevel=3,
            )
    if not working:
        raise RuntimeError(f"no int8 kernel for mode {mode!r} works on {device}")
    return tuple(working)


# ---------------------------------------------------------------------------- the layer
class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel fp32 scales.

    State (what is saved): ``weight`` int8 ``(out_features, in_features)``, ``weight_scale``
    fp32 ``(out_features,)`` and ``bias`` (float parameter) when the original had one.

    ``forward(x)``: ``(..., in_features) -> (..., out_features)`` in ``x``'s dtype. The kernel is
    chosen per device type on first use (see :data:`KERNEL_ORDER`) and recorded in
    :attr:`kernels`.

    Args:
        in_features, out_features: sizes.
        bias: whether there is a bias.
        mode: ``"int8"`` or ``"int8-dynamic"``.
        prefer: a kernel name to try first (None: the per-device order).
        device, dtype: where to allocate, and the bias dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        mode: str,
        prefer: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_mode(mode)
        self.in_features, self.out_features = in_features, out_features
        self.mode = mode
        self.prefer = prefer
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.empty(out_features, dtype=torch.float32, device=device)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        )
        self.kernels: dict[str, str] = {}  # device -> kernel name, filled on first use
        self._runs: dict[torch.device, Callable] = {}  # the same, as functions (hot path)
        self._packed = None  # a kernel's private packed weight (fbgemm), never saved

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, prefer: str | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear`` (see :func:`quantize_weight`); the bias is kept as is."""
        w = linear.weight
        layer = cls(
            w.shape[1],
            w.shape[0],
            linear.bias is not None,
            mode,
            prefer,
            device=w.device,
            dtype=w.dtype,
        )
        q, scale = quantize_weight(w)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def kernel_for(self, device: torch.device) -> str:
        """The kernel name this layer uses on ``device``: the first working one in
        :data:`KERNEL_ORDER` that fits its shape, else the last working one (resolved once).

        Raises:
            RuntimeError: the layer's ``prefer`` kernel does not work on ``device``.
        """
        key = str(device)
        if key not in self.kernels:
            working = _working_kernels(self.mode, key, self.prefer)
            fits = [
                k
                for k in working
                if KERNELS[k].fits(self.in_features, self.out_features, device.type)
            ]
            self.kernels[key] = fits[0] if fits else working[-1]
        return self.kernels[key]

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``(out_features, in_features)`` fp32 it stands for,
        ``int8 * scale[:, None]`` (for code that needs the matrix itself, such as MLA's absorbed
        ``kv_b_proj``)."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._runs.get(x.device)
        if run is None:
            run = self._runs[x.device] = KERNELS[self.kernel_for(x.device)].run
        out = run(self, x.reshape(-1, self.in_features))  # (N, out)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(x.shape[:-1] + (self.out_features,))

    def _apply(self, fn, recurse=True):
        self._packed = None  # moved or cast: repack lazily
        self._runs = {}
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # model.to(bf16): scales stay exact fp32
            self.weight_scale = scale.to(self.weight_scale.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}"
        )


# ---------------------------------------------------------------------------- the transform
def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`.

    Raises:
        ValueError: an unknown mode (the message lists the known ones).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _targets(module: CausalLM, lm_head: bool) -> list[tuple[nn.Module, str, str]]:
    """``(parent, attribute, qualified name)`` of every Linear to quantize."""
    out = []
    for name, parent in module.model.layers.named_modules(prefix="model.layers"):
        if name.endswith(".indexer"):  # DeepSeek-V3.2's token selection stays in float
            continue
        for attr, child in parent.named_children():
            if type(child) is nn.Linear:
                out.append((parent, attr, f"{name}.{attr}"))
    if lm_head and type(module.lm_head) is nn.Linear:
        out.append((module, "lm_head", "lm_head"))
    return out


def quantize_model(
    module: CausalLM, mode: str, lm_head: bool = False, kernel: str | None = None
) -> CausalLM:
    """Quantize a :class:`CausalLM` to int8 in place and return it.

    Every ``nn.Linear`` under ``model.layers`` (attention and MLP / expert projections) becomes
    an :class:`Int8Linear`; embeddings, norms and the MoE router stay in float, and so does
    ``lm_head`` unless ``lm_head=True`` (with tied embeddings the embedding stays float and the
    head gets its own int8 copy). The forward signature is unchanged. Afterwards
    ``module.quantization == {"quant_method": "deepwhale-int8", "mode": mode, "lm_head": ...,
    "kernels": {kernel name: number of layers}}``.

    Args:
        module: the model (fp32, bf16 or fp16; any device but ``meta``).
        mode: ``"int8"`` (weight-only, W8A16) or ``"int8-dynamic"`` (W8A8, per-token
            activations).
        lm_head: also quantize ``lm_head``.
        kernel: force a kernel from :data:`KERNELS` (default: the fastest for the device).

    Returns:
        ``module`` itself.

    Raises:
        ValueError: unknown mode, unknown kernel or one of the other mode, an already quantized
            or ``meta`` module.
        RuntimeError: ``kernel`` was forced and does not work on this device.
    """
    check_mode(mode)
    if kernel is not None and (kernel not in KERNELS or KERNELS[kernel].mode != mode):
        names = [k for k, v in KERNELS.items() if v.mode == mode]
        raise ValueError(f"unknown kernel {kernel!r} for mode {mode!r}; use one of {names}")
    if getattr(module, "quantization", None):
        raise ValueError(f"the model is already quantized ({module.quantization['mode']})")
    device = module.lm_head.weight.device
    if device.type == "meta":
        raise ValueError("cannot quantize a model on the meta device; load its weights first")
    with torch.no_grad():
        for parent, attr, _ in _targets(module, lm_head):
            setattr(parent, attr, Int8Linear.from_linear(getattr(parent, attr), mode, kernel))
    _finish(module, mode, lm_head)
    return module


def _finish(module: CausalLM, mode: str, lm_head: bool) -> None:
    """Record the mode, resolve each layer's kernel for its device and pack what needs it."""
    counts: dict[str, int] = {}
    for layer in module.modules():
        if isinstance(layer, Int8Linear):
            name = layer.kernel_for(layer.weight.device)
            counts[name] = counts.get(name, 0) + 1
            if name == "fbgemm":
                layer._packed = _fbgemm_pack(layer.weight, layer.weight_scale)
    module.quantization = {
        "quant_method": QUANT_METHOD,
        "mode": mode,
        "lm_head": lm_head,
        "kernels": counts,
    }


def weight_bytes(module: nn.Module, linear_only: bool = False) -> int:
    """Bytes of the model's weights: parameters, int8 weights and scales, persistent buffers.

    Tied tensors count once; non-persistent buffers (RoPE tables) and caches are not weights.

    Args:
        module: a :class:`CausalLM`, quantized or not (torchao tensor subclasses count their
            plain-tensor parts).
        linear_only: count only the Linear layers under ``model.layers`` (attention and
            MLP / experts; not ``lm_head``, embeddings, norms or the router).

    Returns:
        Size in bytes.
    """
    if linear_only:
        parts, names = [], set()
        for name, m in module.model.layers.named_modules():
            linear = isinstance(m, (nn.Linear, Int8Linear)) or hasattr(m, "_packed_params")
            if linear and name.rpartition(".")[0] not in names:  # not torch.ao's inner params
                parts.append(m)
                names.add(name)
    else:
        parts = [module]
    unique = {}  # id -> tensor; holding them keeps ids from being reused
    for part in parts:
        for t in part.state_dict(keep_vars=True).values():
            unique.setdefault(id(t), t)
    return sum(_tensor_bytes(t) for t in unique.values())


def _tensor_bytes(t) -> int:
    if isinstance(t, tuple):  # torch.ao dynamic Linear's packed params: (qweight, bias)
        return sum(_tensor_bytes(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: count its plain parts
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def load_quantized(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> CausalLM:
    """Load a folder written by :func:`~deepwhale.checkpoint.quantized.save_quantized`.

    The model is built on the ``meta`` device from ``config.json``, its Linears replaced by
    :class:`Int8Linear`, and the int8 weights, fp32 scales and float tensors read through
    safetensors' memory map (:func:`~deepwhale.checkpoint.quantized.read_quantized_state`) are
    assigned. Logits are bitwise identical to the saved module's on the same device and kernel.

    Args:
        folder: the checkpoint folder.
        device: target device; kernels are chosen for it.
        dtype: dtype of the float tensors (default: the saved ``torch_dtype``; router stays fp32).

    Returns:
        The quantized :class:`CausalLM` in eval mode, with ``.quantization`` set.

    Raises:
        ConfigError: config.json missing or malformed.
        CheckpointError (a ``ValueError``): an unknown ``quant_method`` or mode; a missing,
            unexpected or wrongly shaped tensor; a quantized weight that is not int8 or whose
            ``weight_scale`` is missing or not fp32 (the message names the key and the file).
    """
    folder = Path(folder)
    config = ModelConfig.from_json_file(folder / "config.json")
    mode, lm_head = read_quantization_config(config, folder / "config.json")
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype or "float32", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(
                f"{folder / 'config.json'}: bad torch_dtype {config.torch_dtype!r}"
            )
    files, _ = checkpoint_files(folder)
    with torch.device("meta"):
        model = CausalLM(config)
        for parent, attr, _ in _targets(model, lm_head):
            old = getattr(parent, attr)
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, mode)
            setattr(parent, attr, new)
    tied = config.tie_word_embeddings and not lm_head
    load_device = str(device) if str(device).startswith("cuda") else "cpu"
    loaded = read_quantized_state(folder, files, model.state_dict(), tied, dtype, load_device)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = RotaryEmbedding(config, device=load_device)
    model = model.to(device).eval()
    _finish(model, mode, lm_head)
    return model


__all__ = [
    "KERNELS",
    "KERNEL_ORDER",
    "MODES",
    "QUANT_METHOD",
    "Int8Linear",
    "Kernel",
    "check_mode",
    "is_quantized_checkpoint",
    "load_quantized",
    "quantization_config",
    "quantize_model",
    "quantize_rows",
    "quantize_weight",
    "save_quantized",
    "weight_bytes",
]
