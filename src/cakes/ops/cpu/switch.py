"""The fast-path switch (``CAKES_FAST_PATH``, :func:`set_fast_path`) and the per-call test whether it runs.

With the switch on (the default), :func:`~cakes.ops.cpu.function.cakes_conv3d` runs the CPU fast path
wherever :func:`fast_path_applies`; off, it runs the reference form
(:func:`cakes.ops.reference.grouped_conv3d`: ``F.conv3d`` per group, ``torch.cat``, bias) everywhere —
same values and gradients, for A/B timing and debugging. The same switch decides whether the
layout-keeping rewrites of plain modules run (:func:`channels_last_rewrite_applies`):
:class:`cakes.ops.pointwise.PointwiseConv3d` (the backbones' 1x1x1 convolutions as one GEMM) and
:class:`cakes.ops.norm.InstanceNorm3d` (C2FNAS's norms without a layout change). Settings:

* the ``CAKES_FAST_PATH`` environment variable, read at import: ``1``/``on``/``true``/``yes``
  (default) or ``0``/``off``/``false``/``no``;
* :func:`set_fast_path` for this process (it also sets the variable, so DDP and data-loader
  workers follow), or the :func:`fast_path` context manager for a block.

Execution plans (:mod:`cakes.ops.plan`) cache their choice per input key, not per switch state: after
toggling, call :func:`cakes.ops.plan.clear` (or pin a plan mode such as ``fused``) for A/B runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from cakes.ops.cpu import torch_shim
from cakes.utils import env_restored

ENV_VAR = "CAKES_FAST_PATH"
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def _parse_switch(value: str, where: str) -> bool:
    word = value.strip().lower()
    if word not in _ON + _OFF:
        raise ValueError(f"{where}: expected one of {list(_ON + _OFF)} for the CPU fast path, got {value!r}")
    return word in _ON


class _State:
    enabled: bool = _parse_switch(os.environ.get(ENV_VAR, "1"), f"environment variable {ENV_VAR}")


def set_fast_path(enabled: bool) -> None:
    """Turn the CPU fast path on or off for this process (and, via ``CAKES_FAST_PATH``, its workers)."""
    _State.enabled = bool(enabled)
    os.environ[ENV_VAR] = "1" if _State.enabled else "0"


def fast_path_enabled() -> bool:
    """Whether the switch is on (the fast path may still not apply to a call: :func:`fast_path_applies`)."""
    return _State.enabled


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    """``with fast_path(False): ...`` — the switch set for a block, then restored (the variable too)."""
    previous = _State.enabled
    with env_restored(ENV_VAR):
        set_fast_path(enabled)
        try:
            yield
        finally:
            _State.enabled = previous


def fast_path_applies(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None) -> bool:
    """The fast path runs this call: switch on, private entry points usable (:mod:`.torch_shim`), a 5-D
    float32/float64 CPU input ``(N, C_in, T, H, W)`` with weights and bias alike, and no dispatch mode or
    ``torch.func`` transform active (FLOP/MAC counters, fake tensors, tracers and transforms see the
    plain convolutions)."""
    return (
        _State.enabled
        and torch_shim.SUPPORTED
        and x.device.type == "cpu"
        and x.dim() == 5
        and x.dtype in (torch.float32, torch.float64)
        and all(w.device.type == "cpu" and w.dtype == x.dtype for w in weights)
        and (bias is None or (bias.device.type == "cpu" and bias.dtype == x.dtype))
        and not torch_shim.dispatch_or_transform_active()
    )


def channels_last_rewrite_applies(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None) -> bool:
    """A layout-keeping rewrite of a plain module (:mod:`cakes.ops.pointwise`, :mod:`cakes.ops.norm`)
    runs this call: :func:`fast_path_applies`, a channels-last input, and no ONNX export tracing (the
    exported graph keeps the plain operator, which onnxruntime fuses with its neighbours)."""
    return (
        fast_path_applies(x, weights, bias)
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and not torch.onnx.is_in_onnx_export()
    )
