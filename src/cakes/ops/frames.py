"""Frame-wise execution: a heterogeneous 3D convolution as 2-D convolutions over frames plus a shift-sum.

A sub-kernel of size ``(t, h, w)`` is ``t`` two-dimensional ``(h, w)`` kernels, one per offset along
the first kernel axis (time for video, depth for volumes)::

    y[:, :, i] = sum_j conv2d(x[:, :, i + j - t // 2], W[:, :, j])      (zero outside [0, T))

Every 2-D slice of every group that shares one ``(h, w)`` size becomes a row of one 2-D convolution
over the ``N·T`` frames (a *bank*); the groups' outputs are then the sums of their rows shifted along
the frame axis. The MACs are exactly those of the groups (a ``3x3x3`` row is three ``3x3`` rows); what
changes is the primitive: one full-width 2-D convolution per bank instead of one thin 3-D convolution
per group. On the project machines oneDNN runs 2-D convolutions at a much higher throughput than 3-D
ones at the early ResNet stages (see docs/performance.md#frame-wise-execution), and a channels-last
``(N, C, T, H, W)`` tensor is a channels-last ``(N·T, C, H, W)`` batch of frames without a copy.

Only for a stride of 1 along the first axis (never strided in either backbone); ``groups=1``.
Device-agnostic (plain ``conv2d``, slicing, in-place adds): the same code runs on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel


def supports(subs: Sequence[SubKernel], stride: tuple[int, int, int]) -> bool:
    """Whether :func:`frame_conv3d` can run this layer: unit stride along the first axis."""
    return stride[0] == 1 and len(subs) > 0


def bank_rows(subs: Sequence[SubKernel]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """``{(h, w): [(group, offset), ...]}``: which 2-D slices each bank's convolution computes, in row order."""
    banks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for group, sub in enumerate(subs):
        depth, height, width = sub.size
        for offset in range(depth):
            banks.setdefault((height, width), []).append((group, offset))
    return banks


def frame_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
) -> Tensor:
    """Same function as :func:`~cakes.ops.reference.grouped_conv3d` (values and gradients), run frame-wise.

    ``x``: ``(N, C_in, T, H, W)``; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``; ``bias``: ``(C_out,)``.
    Output ``(N, C_out, T, H', W')`` in channels-last memory, channels in group order.
    """
    if not supports(subs, stride):
        raise ValueError(f"frame-wise execution needs stride 1 along the first axis, got stride {stride}")
    n, c_in, depth, height, width = x.shape
    frames = x.transpose(1, 2).reshape(n * depth, c_in, height, width)  # a view for channels-last inputs
    rows_of: dict[tuple[int, int], Tensor] = {}  # (group, offset) -> (N, T, H', W', n_group) view
    for (kh, kw), rows in bank_rows(subs).items():
        bank = torch.cat([weights[g][:, :, j] for g, j in rows]) if len(rows) > 1 else weights[rows[0][0]][:, :, 0]
        y = F.conv2d(frames, bank, stride=stride[1:], padding=(kh // 2, kw // 2))  # (N·T, rows·n, H', W')
        y = y.view(n, depth, *y.shape[1:]).permute(0, 1, 3, 4, 2)  # (N, T, H', W', bank channels)
        start = 0
        for g, j in rows:
            rows_of[g, j] = y[..., start : start + weights[g].shape[0]]
            start += weights[g].shape[0]

    first = rows_of[0, 0]
    out = first.new_empty((n, depth, *first.shape[2:4], sum(w.shape[0] for w in weights)))
    start = 0
    for g, sub in enumerate(subs):
        pad, stop = sub.size[0] // 2, start + weights[g].shape[0]
        target = out[..., start:stop]
        target.copy_(rows_of[g, pad])
        for j in range(sub.size[0]):
            shift = j - pad  # out[:, i] += rows[j][:, i + shift]
            if j == pad or abs(shift) >= depth:
                continue
            if shift > 0:
                target[:, :-shift] += rows_of[g, j][:, shift:]
            else:
                target[:, -shift:] += rows_of[g, j][:, :shift]
        start = stop
    if bias is not None:
        out = out + bias
    return out.permute(0, 4, 1, 2, 3)
