"""The only caller of private PyTorch entry points: each is checked against the installed torch at import.

Policy: a missing or misbehaving entry point never raises. It disables the CPU fast path for the
process, with ONE logged warning naming it (:data:`SUPPORTED` is false, :data:`UNSUPPORTED_REASON`
says why); every call then runs the reference form (:func:`cakes.ops.reference.grouped_conv3d`),
and :func:`dispatch_or_transform_active` answers ``True`` (the plain form is correct under any
tracer or counter). The oneDNN in-place convolution-add is optional (absent in builds without
oneDNN, as before this module existed): if it is missing or fails its check,
:data:`convolution_add_` is ``None`` and the backward sums per-group input gradients instead. A
torch other than the tested minor version (:data:`TESTED_TORCH`) logs a warning; the probes
decide what runs.

Entry points and what is checked (tiny fixed float32 CPU tensors, no random numbers, whatever the
default device, dtype or grad mode at import):

* ``torch._C._len_torch_dispatch_stack`` — an int that grows inside a ``FlopCounterMode``;
* ``torch._C._functorch.peek_interpreter_stack`` — not ``None`` inside ``torch.func.vmap``;
* ``torch.ops.aten.convolution_backward`` — the input and weight gradients of a small convolution
  equal autograd's;
* ``torch.ops.mkldnn._convolution_pointwise_.binary`` (``"add"``) — adds a small convolution into
  its accumulator in place, equal to ``F.conv2d(x, w) + acc``;
* ``torch.ops.mkldnn._reorder_convolution_weight`` + ``torch.ops.mkldnn._convolution_pointwise``
  (optional, inference only) — a weight packed once into oneDNN's blocked layout, then a strided,
  padded channels-last 3-D convolution with bias, equal to ``F.conv3d`` (:data:`packed_convolution`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from cakes.ops.cpu import primitive_cache

# The probes below are the package's first oneDNN primitives, and oneDNN reads its cache capacity
# when it creates the first one: raise it now, or a process running several networks stays at 1024.
primitive_cache.raise_capacity()

log = logging.getLogger(__name__)

#: the torch minor version these entry points were checked against (the pinned 2.13.0)
TESTED_TORCH = (2, 13)


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _probe_tensor(*shape: int, scale: float = 1.0) -> Tensor:
    """``arange`` values of ``shape`` as float32 on CPU, whatever the default device or dtype at import."""
    return (torch.arange(math.prod(shape), dtype=torch.float32, device="cpu") * scale).view(*shape)


def _probe_ones(*shape: int) -> Tensor:
    """Ones of ``shape`` as float32 on CPU (see :func:`_probe_tensor`)."""
    return torch.ones(shape, dtype=torch.float32, device="cpu")


def _probe_dispatch_checks() -> str | None:
    """Why the dispatch-mode / transform checks are unusable, or ``None``: the dispatch stack grows inside
    a FLOP counter (a ``TorchDispatchMode``), and the functorch interpreter stack is set inside ``vmap``."""
    inside: list[object] = []

    def peek(t: Tensor) -> Tensor:
        inside.append(torch._C._functorch.peek_interpreter_stack())
        return t

    try:
        outside = torch._C._len_torch_dispatch_stack()
        with FlopCounterMode(display=False):
            counted = torch._C._len_torch_dispatch_stack()
        torch.func.vmap(peek)(_probe_tensor(2))
    except (AttributeError, RuntimeError, TypeError) as error:
        return f"torch._C dispatch/functorch stack checks failed: {error!r}"
    if not (isinstance(outside, int) and isinstance(counted, int) and counted > outside):
        return f"torch._C._len_torch_dispatch_stack does not see a FLOP counter ({outside!r} -> {counted!r})"
    if not inside or inside[-1] is None:
        return "torch._C._functorch.peek_interpreter_stack does not see a vmap transform"
    return None


def _probe_convolution_backward() -> str | None:
    """Why ``aten.convolution_backward`` is unusable, or ``None``."""
    x, w, gy = _probe_tensor(1, 2, 3, 4), _probe_tensor(2, 2, 1, 3, scale=0.1), _probe_ones(1, 2, 3, 4)
    try:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            gy, x, w, None, [1, 1], [0, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        )
    except (AttributeError, RuntimeError, TypeError) as error:
        return f"torch.ops.aten.convolution_backward failed: {error!r}"
    with torch.inference_mode(False), torch.enable_grad():
        x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        want_x, want_w = torch.autograd.grad(F.conv2d(x, w, padding=(0, 1)), [x, w], gy)
    if not (torch.allclose(gx, want_x) and torch.allclose(gw, want_w)):
        return "torch.ops.aten.convolution_backward gradients differ from autograd's"
    return None


def _mkldnn_convolution_add_op() -> Callable | None:
    """``torch.ops.mkldnn._convolution_pointwise_.binary`` when this build has it and it adds in place
    correctly; else ``None`` (logged at debug level: an optional kernel)."""
    if not torch.backends.mkldnn.is_available():
        return None
    packet = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)
    if packet is None:
        return None
    x, w, acc = _probe_tensor(1, 2, 2, 3), _probe_tensor(2, 2, 1, 3, scale=0.1), _probe_ones(1, 2, 2, 3)
    want = F.conv2d(x, w, padding=(0, 1)) + 1
    try:
        out = packet.binary(acc, x, w, None, [0, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
    except (AttributeError, RuntimeError, TypeError) as error:
        log.debug("mkldnn._convolution_pointwise_ unusable (%r): input gradients are summed per group", error)
        return None
    if out is not acc or not torch.allclose(acc, want):
        log.debug("mkldnn._convolution_pointwise_ does not add in place: input gradients are summed per group")
        return None
    return packet.binary


def _probe_packed_convolution() -> bool:
    """Whether oneDNN convolves a channels-last 3-D input with a weight packed beforehand, equal to
    ``F.conv3d`` (stride, padding and bias included); logged at debug level when not: an optional kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    x = _probe_tensor(1, 2, 2, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last_3d)
    w, b = _probe_tensor(3, 2, 1, 3, 1, scale=0.01), _probe_tensor(3)
    try:
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 1, 0], [1, 2, 1], [1, 1, 1], 1, list(x.shape))
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, b, [0, 1, 0], [1, 2, 1], [1, 1, 1], 1, "none", [], "")
    except (AttributeError, RuntimeError, TypeError) as error:
        log.debug("mkldnn packed convolution unusable (%r): no packed execution", error)
        return False
    want = F.conv3d(x, w, b, stride=(1, 2, 1), padding=(0, 1, 0))
    if out.shape != want.shape or not torch.allclose(out, want, atol=1e-5):
        log.debug("mkldnn packed convolution differs from F.conv3d: no packed execution")
        return False
    return True


def _check() -> str | None:
    """Run every required probe; the first failure's reason, or ``None``."""
    if _torch_minor() != TESTED_TORCH:
        log.warning(
            "cakes CPU fast path: tested with torch %d.%d, running %s; checking its private entry points",
            *TESTED_TORCH,
            torch.__version__,
        )
    for probe in (_probe_dispatch_checks, _probe_convolution_backward):
        reason = probe()
        if reason is not None:
            return reason
    return None


#: why the fast path cannot run with this torch (``None``: it can)
UNSUPPORTED_REASON: str | None = _check()
#: whether the required private entry points exist and behave as expected
SUPPORTED: bool = UNSUPPORTED_REASON is None
if not SUPPORTED:
    log.warning("cakes CPU fast path disabled for this process (reference form runs): %s", UNSUPPORTED_REASON)
_MKLDNN_CONVOLUTION_ADD = _mkldnn_convolution_add_op() if SUPPORTED else None


def dispatch_or_transform_active() -> bool:
    """A ``TorchDispatchMode`` (FLOP/MAC counters, fake tensors, tracers) or a ``torch.func`` transform
    is active; ``True`` when that cannot be checked (see the module docstring)."""
    if not SUPPORTED:
        return True
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None


def convolution_backward(
    gy: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int], need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients (``None`` where not needed) of ``conv(x, w)`` (2-D or 3-D, no bias,
    dilation 1, one group) for the output gradient ``gy``; ``x``: only its shape and layout are read
    when ``need_w`` is false."""
    one, zero = [1] * len(stride), [0] * len(stride)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, one, False, zero, 1, [need_x, need_w, False]
    )
    return gx, gw


def _convolution_add(acc: Tensor, x: Tensor, w: Tensor, padding: list[int]) -> Tensor:
    """``acc += conv(x, w, padding)`` in place (stride 1, dilation 1, one group) by oneDNN's binary
    post-op; returns ``acc``."""
    one = [1] * len(padding)
    return _MKLDNN_CONVOLUTION_ADD(acc, x, w, None, padding, one, one, 1, "add", None, None, [], None)


#: ``convolution_add_(acc, x, w, padding)``: ``acc += conv(x, w)`` in place, or ``None`` where this
#: build has no usable oneDNN in-place add
convolution_add_: Callable[[Tensor, Tensor, Tensor, list[int]], Tensor] | None = (
    _convolution_add if _MKLDNN_CONVOLUTION_ADD is not None else None
)


#: whether :func:`pack_convolution_weight` / :func:`convolve_packed` can run in this build
PACKED_CONVOLUTION: bool = SUPPORTED and _probe_packed_convolution()


def pack_convolution_weight(w: Tensor, padding: list[int], stride: list[int], input_shape: list[int]) -> Tensor:
    """``w`` (``(out, in, t, h, w)``, float32) reordered once into oneDNN's layout for inputs of
    ``input_shape``: an opaque tensor that only :func:`convolve_packed` reads."""
    return torch.ops.mkldnn._reorder_convolution_weight(w, padding, stride, [1] * len(stride), 1, input_shape)


def convolve_packed(x: Tensor, packed: Tensor, bias: Tensor | None, padding: list[int], stride: list[int]) -> Tensor:
    """``F.conv3d(x, w, bias, stride, padding)`` for the weight ``packed`` was made from
    (:func:`pack_convolution_weight`), on oneDNN whatever the batch size; channels-last in and out.
    Not differentiable in the weight: inference only."""
    one = [1] * len(stride)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, one, 1, "none", [], "")
