"""Inference with weights packed once: the ``packed`` execution of :mod:`cakes.ops.plan`.

PyTorch's eager CPU convolution reorders its weight into oneDNN's blocked layout on every call,
and sends batch-1 3-D inputs to a slow non-oneDNN path. In inference the weights do not change, so
this execution packs each group's weight once (:func:`~cakes.ops.cpu.torch_shim.pack_convolution_weight`)
and runs every group as one oneDNN convolution with its bias fused
(:func:`~cakes.ops.cpu.torch_shim.convolve_packed`), then concatenates the groups. Measured gains
are in docs/performance.md#packed-weights-for-inference.

The packed copies are cached per source weight (by identity, checked through a weak reference so a
freed tensor's address can never match) and per input shape, stride and padding (the latest
:data:`MAX_FORMS` of them per weight). An entry is
stale — and repacked — once its weight changes in place (its ``_version`` moves: an optimiser step,
``load_state_dict``, batch-norm folding) or its storage is swapped (``param.data = …``); it is
dropped when the weight is freed. Only for channels-last float32 CPU inputs with no gradient
needed (:func:`applies`); everything else runs another execution.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cakes.ops.cpu import torch_shim
from cakes.ops.cpu.switch import fast_path_enabled
from cakes.ops.cpu.units import fill_block, plan_units, unit_weight
from cakes.ops.reference import dense_weight
from cakes.ops.subkernel import SubKernel

#: packed forms of one weight: (input shape, stride, padding) -> opaque oneDNN tensor
_Forms = dict[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], Tensor]
#: what a packed weight is: a description of how it is built (hashable) and its source tensors' identities
_Key = tuple[Hashable, tuple[int, ...]]


@dataclass
class _Entry:
    sources: tuple[weakref.ref, ...]
    state: tuple[tuple[int, int], ...]  # (version, data pointer) of each source when packed
    forms: _Forms = field(default_factory=dict)


_CACHE: dict[_Key, _Entry] = {}
#: packed forms kept per weight (the most recently made): inputs of many shapes do not grow the cache
MAX_FORMS = 4


def clear() -> None:
    """Forget every packed weight (they are repacked on their next call)."""
    _CACHE.clear()


def packed_count() -> int:
    """How many packed copies are cached, over every weight and form (for tests and diagnostics)."""
    return sum(len(entry.forms) for entry in _CACHE.values())


def applies(x: Tensor, needs_grad: bool) -> bool:
    """Whether the packed execution can run: the CPU fast-path switch is on
    (:func:`cakes.ops.set_fast_path`), oneDNN's packed convolution works in this build, and ``x`` is a
    channels-last float32 5-D CPU tensor in a call that needs no gradient (the weights must match it:
    :func:`packed_conv3d` checks)."""
    return (
        fast_path_enabled()
        and torch_shim.PACKED_CONVOLUTION
        and not needs_grad
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 5
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _forget(key: _Key) -> None:
    _CACHE.pop(key, None)


def packed_weight(
    what: Hashable,
    sources: Sequence[Tensor],
    build: Callable[[], Tensor],
    input_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> Tensor:
    """The packed copy of the weight ``build()`` makes from ``sources`` for this input shape and
    geometry; built and packed now if it is missing or any source changed since. ``what`` names the
    build (a unit's rows, a zero-padded dense weight), so two weights made differently from the same
    sources never share an entry. A source made under ``torch.inference_mode`` (it has no version
    counter, e.g. the zero-padded weight ``dense`` builds there) is packed on every call, uncached."""
    if any(t.is_inference() for t in sources):  # made under inference_mode: no version counter to check
        with torch.no_grad():
            return torch_shim.pack_convolution_weight(build(), list(padding), list(stride), list(input_shape))
    key = (what, tuple(id(t) for t in sources))
    state = tuple((t._version, t.data_ptr()) for t in sources)
    entry = _CACHE.get(key)
    if (
        entry is None
        or entry.state != state
        or any(ref() is not t for ref, t in zip(entry.sources, sources, strict=True))
    ):
        refs = tuple(weakref.ref(t, lambda _, k=key: _forget(k)) for t in sources)
        entry = _CACHE[key] = _Entry(refs, state)
    form = (input_shape, stride, padding)
    packed = entry.forms.get(form)
    if packed is None:
        if len(entry.forms) >= MAX_FORMS:
            del entry.forms[next(iter(entry.forms))]  # the oldest
        with torch.no_grad():
            weight = build()
        packed = entry.forms[form] = torch_shim.pack_convolution_weight(
            weight, list(padding), list(stride), list(input_shape)
        )
    return packed


def packed_conv3d(
    x: Tensor, weights: Sequence[Tensor], subs: Sequence[SubKernel], stride: tuple[int, int, int], bias: Tensor | None
) -> Tensor:
    """Same values as :func:`~cakes.ops.reference.grouped_conv3d`: one packed convolution per unit of
    the CPU fast path's work plan (:func:`~cakes.ops.cpu.units.plan_units`: a group, its last partial
    output-channel block filled with the leading rows of the next group when that group's sub-kernel
    fits inside, zero-padded), each unit's weight built and packed once (inference only: see
    :func:`applies`).

    ``x``: ``(N, C_in, T, H, W)`` channels-last; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``;
    ``bias``: ``(C_out,)``. Output ``(N, C_out, T', H', W')`` channels-last, channels in group order.
    """
    if any(w.dtype != x.dtype or w.device != x.device for w in weights):
        raise TypeError(f"packed_conv3d: weights must be {x.dtype} on {x.device} like the input")
    shape, outputs = tuple(x.shape), []
    sizes = tuple(w.shape[0] for w in weights)
    for unit in plan_units(subs, sizes, stride, fill_block(x)):
        sources = tuple(weights[group] for group, _, _ in unit.parts)
        build = functools.partial(unit_weight, unit, weights, subs)  # called under no_grad, on a miss only
        packed = packed_weight(unit.parts, sources, build, shape, tuple(stride), tuple(unit.sub.padding))
        unit_bias = None if bias is None else bias.detach()[unit.start : unit.stop]
        outputs.append(torch_shim.convolve_packed(x, packed, unit_bias, list(unit.sub.padding), list(stride)))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def packed_pointwise_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int, int]) -> Tensor:
    """A 1x1x1 convolution with its weight packed once, bias fused (inference only: see :func:`applies`).
    In ResNet-50 I3D's bottleneck shapes at 8×112², batch 1, it ran in 0.67–0.91 ms where the GEMM
    with its bias took 0.73–1.04 (docs/performance.md#packed-weights-for-inference).

    ``x``: ``(N, C_in, T, H, W)`` channels-last; ``weight``: ``(C_out, C_in, 1, 1, 1)``; ``bias``:
    ``(C_out,)``. Output ``(N, C_out, T/s_T, H/s_H, W/s_W)`` channels-last."""
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"packed_pointwise_conv3d: the weight must be {x.dtype} on {x.device} like the input")
    packed = packed_weight("pointwise", (weight,), weight.detach, tuple(x.shape), tuple(stride), (0, 0, 0))
    return torch_shim.convolve_packed(x, packed, None if bias is None else bias.detach(), [0, 0, 0], list(stride))


def packed_dense_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    kernel_size: int,
) -> Tensor:
    """The groups as ONE ``kxkxk`` convolution with their zero-padded weight
    (:func:`~cakes.ops.reference.dense_weight`), built and packed once while the groups are unchanged
    (what the all-3D layer of this shape costs when it runs packed). Shapes as :func:`packed_conv3d`."""
    padding = (kernel_size // 2,) * 3
    build = functools.partial(dense_weight, weights, subs, kernel_size)
    packed = packed_weight(("dense", kernel_size), tuple(weights), build, tuple(x.shape), tuple(stride), padding)
    return torch_shim.convolve_packed(x, packed, None if bias is None else bias.detach(), list(padding), list(stride))
