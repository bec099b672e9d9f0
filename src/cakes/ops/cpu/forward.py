"""Forward kernel of the CPU fast path: every unit written into one preallocated output, bias fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cakes.ops.cpu.layout import is_channels_last, memory_format_of, output_length, uses_onednn, write_rows
from cakes.ops.cpu.matmul import matmul_forward, spatial_sample
from cakes.ops.cpu.units import Unit, fill_block, plan_units, runs_as_matmul, unit_weight
from cakes.ops.cpu.views import ConvView
from cakes.ops.subkernel import SubKernel

#: channels-last forward convolutions with a full k×k×k sub-kernel run in chunks of this many output
#: channels: oneDNN's channels-last forward (brgconv) costs ~0.39 ms per 3x3x3 output channel at 32
#: or 256 channels (blocked by 32) but ~0.49 at 96, 128 or 192 (blocked by 48 or 64; 256@8x28x28,
#: batch 2, 2 threads). 2D sub-kernels cost the same per channel at any width, so they run whole.
CHANNELS_LAST_FORWARD_CHUNK = 32


def layout_weights(
    x: Tensor, weights: Sequence[Tensor], subs: Sequence[SubKernel], stride: tuple[int, int, int]
) -> list[Tensor]:
    """Convolution weights in ``x``'s layout, converted once per step (``F.conv3d`` and its backward
    would convert them on every call: channels-last input -> channels-last weight)."""
    fmt = memory_format_of(x)
    return [
        w if runs_as_matmul(sub, stride) else w.contiguous(memory_format=fmt)
        for w, sub in zip(weights, subs, strict=True)
    ]


def _convolution_unit_forward(
    x: Tensor,
    w: Tensor,
    unit: Unit,
    stride: tuple[int, int, int],
    bias: Tensor | None,
    y: Tensor,
    out_index: Tensor | None,
    onednn_cl: bool,
) -> None:
    """Rows of a convolution unit into ``y`` (in chunks of :data:`CHANNELS_LAST_FORWARD_CHUNK` for full
    ``kxkxk`` kernels on oneDNN channels-last); ``bias``: the unit's rows of the bias."""
    full_3d = all(size > 1 for size in unit.sub.size)
    chunk = CHANNELS_LAST_FORWARD_CHUNK if full_3d and onednn_cl else w.shape[0]
    for c in range(0, w.shape[0], chunk):
        bias_c = None if bias is None else bias[c : c + chunk]
        rows = ConvView.of(unit.sub, stride, x).forward(x, w[c : c + chunk], bias_c)
        write_rows(y, unit.start + c, unit.start + c + rows.shape[1], rows, out_index)


def fast_forward(
    x: Tensor,
    weights: list[Tensor],
    subs: tuple[SubKernel, ...],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    out_index: Tensor | None,
) -> tuple[Tensor, dict[Unit, Tensor]]:
    """The output ``(N, C_out, T', H', W')`` of ``x`` ``(N, C_in, T, H, W)``, and each unit
    (:func:`~cakes.ops.cpu.units.plan_units` with the fill block, in order) with its weight, in
    ``x``'s layout when ``weights`` are (see :func:`layout_weights`)."""
    units = plan_units(subs, [w.shape[0] for w in weights], stride, fill_block(x))
    unit_weights = [unit_weight(u, weights, subs) for u in units]
    # oneDNN channels-last convolutions read the input once for all taps; the shifted matrix products
    # read it once per tap, which costs more than the extra copy into the output there
    onednn_cl = uses_onednn(x) and is_channels_last(x)
    if len(units) == 1 and (onednn_cl or not units[0].matmul) and out_index is None:
        return ConvView.of(units[0].sub, stride, x).forward(x, unit_weights[0], bias), {units[0]: unit_weights[0]}
    N, _, T, H, W = x.shape
    fmt = memory_format_of(x)
    out_size = (output_length(T, stride[0]), output_length(H, stride[1]), output_length(W, stride[2]))
    y = torch.empty((N, units[-1].stop, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
    if bias is not None and out_index is not None:
        bias = bias.index_select(0, out_index)  # per row
    x_s = None
    for u, w in zip(units, unit_weights, strict=True):
        bias_u = None if bias is None else bias[u.start : u.stop]
        if not u.matmul or onednn_cl:
            _convolution_unit_forward(x, w, u, stride, bias_u, y, out_index, onednn_cl)
            continue
        if x_s is None:
            x_s = spatial_sample(x, stride)
        if out_index is None:
            matmul_forward(x_s, w, u.sub, y, u.start, u.stop, bias_u)
        else:
            rows = torch.empty((N, u.stop - u.start, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
            matmul_forward(x_s, w, u.sub, rows, 0, u.stop - u.start, bias_u)
            write_rows(y, u.start, u.stop, rows, out_index)
    return y, dict(zip(units, unit_weights, strict=True))
