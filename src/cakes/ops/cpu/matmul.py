"""Matrix-product kernels of ``kx1x1`` sub-kernels: each temporal tap is one shifted ``addmm`` per sample.

On the flattened ``(C, T·H·W)`` view of a sample, temporal tap ``d`` is a column offset of ``d·H·W``,
so a tap is one exact ``addmm`` over the frames it touches (no padding, no im2col, no oneDNN
layout reorders).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cakes.ops.cpu.layout import memory_format_of, sample_matrix
from cakes.ops.subkernel import SubKernel


def temporal_taps(sub: SubKernel, frames: int, frame: int) -> Iterator[tuple[int, slice, slice]]:
    """``(tap, output columns, input columns)`` of each temporal tap that touches a clip of ``frames``
    frames of ``frame`` pixels, centre tap (which covers every column) first."""
    p = sub.size[0] // 2
    for i in sorted(range(sub.size[0]), key=lambda i: abs(i - p)):
        d = i - p
        lo, hi = max(0, -d), frames - max(0, d)
        if hi > lo:
            yield i, slice(lo * frame, hi * frame), slice((lo + d) * frame, (hi + d) * frame)


def spatial_sample(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """The input a ``kx1x1`` group reads at spatial stride (every s-th row / column), in ``x``'s layout:
    ``(N, C, T, H, W) -> (N, C, T, H', W')``."""
    if stride[1] == 1 and stride[2] == 1:
        return x
    return x[:, :, :, :: stride[1], :: stride[2]].contiguous(memory_format=memory_format_of(x))


def tap_weights(w: Tensor) -> Tensor:
    """``(out, in, k, 1, 1) -> (k, out, in)`` contiguous, one matrix per temporal tap."""
    return w[:, :, :, 0, 0].permute(2, 0, 1).contiguous()


def matmul_forward(
    x_s: Tensor, w: Tensor, sub: SubKernel, y: Tensor, start: int, stop: int, bias: Tensor | None
) -> None:
    """``y[:, start:stop] = conv(x_s, w) (+ bias)`` for a ``(stop - start, C_in, k, 1, 1)`` weight, as shifted
    matrix products; ``x_s``: the spatially sampled input ``(N, C_in, T, H', W')``, ``y``: ``(N, C, T, H', W')``."""
    frames, frame = x_s.shape[2], x_s.shape[3] * x_s.shape[4]
    wt = tap_weights(w)
    for n in range(x_s.shape[0]):
        X, Y = sample_matrix(x_s, n), sample_matrix(y, n)[start:stop]
        for k, (i, cols_out, cols_in) in enumerate(temporal_taps(sub, frames, frame)):
            if k == 0 and bias is None:  # centre tap: every column, beta = 0
                torch.mm(wt[i], X, out=Y)
                continue
            if k == 0:
                Y.copy_(bias.view(-1, 1).expand_as(Y))
            dst = Y[:, cols_out]
            torch.addmm(dst, wt[i], X[:, cols_in], out=dst)


def matmul_backward(
    gy: Tensor,
    start: int,
    stop: int,
    x_s: Tensor | None,
    w: Tensor,
    sub: SubKernel,
    gx_s: Tensor | None,
) -> Tensor | None:
    """Gradients of a ``(stop - start, C_in, k, 1, 1)`` weight on output-gradient rows ``gy[:, start:stop]``
    (``gy``: ``(N, C, T, H', W')``): accumulates the input gradient into ``gx_s`` (spatially sampled,
    ``(N, C_in, T, H', W')``) if given, returns the weight gradient if ``x_s`` (the sampled input) is given."""
    frames, frame = gy.shape[2], gy.shape[3] * gy.shape[4]
    wt = tap_weights(w)
    gw = w.new_zeros(wt.shape) if x_s is not None else None
    for n in range(gy.shape[0]):
        G = sample_matrix(gy, n)[start:stop]
        for i, cols_out, cols_in in temporal_taps(sub, frames, frame):
            if gx_s is not None:
                dst = sample_matrix(gx_s, n)[:, cols_in]
                torch.addmm(dst, wt[i].t(), G[:, cols_out], out=dst)
            if gw is not None:
                torch.addmm(gw[i], G[:, cols_out], sample_matrix(x_s, n)[:, cols_in].t(), out=gw[i])
    return None if gw is None else gw.permute(1, 2, 0).reshape(w.shape)
