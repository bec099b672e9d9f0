"""Frame-wise execution: a heterogeneous 3D convolution as 2-D convolutions over frames plus a shift-sum.

A sub-kernel of size ``(t, h, w)`` is ``t`` two-dimensional ``(h, w)`` kernels, one per offset along
the first kernel axis (time for video, depth for volumes)::

    y[:, :, i] = sum_j conv2d(x[:, :, i + j - t // 2], W[:, :, j])      (zero outside [0, T))

Every 2-D slice of every group that shares one ``(h, w)`` size becomes a row of one 2-D convolution
over the ``N·T`` frames (a *bank*); the groups' outputs are then the sums of their rows shifted along
the frame axis. The MACs are exactly those of the groups (a ``3x3x3`` row is three ``3x3`` rows); what
changes is the primitive: one full-width 2-D convolution per bank instead of one thin 3-D convolution
per group, with a batch of ``N·T`` frames — which keeps PyTorch's CPU convolution on oneDNN where a
batch-1 clip would go to its slow path
(docs/performance.md#batch-1-cpu-convolutions-frame-wise-and-time-split-executions). A
channels-last ``(N, C, T, H, W)`` tensor is a channels-last ``(N·T, C, H, W)`` batch of frames
without a copy.

Only for a stride of 1 along the first axis (never strided in either backbone); ``groups=1``.
Device-agnostic (``conv2d``, slicing, in-place adds in one autograd node): the same code runs on CUDA.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel


def supports(subs: Sequence[SubKernel], stride: tuple[int, int, int]) -> bool:
    """Whether :func:`frame_conv3d` can run this layer: unit stride along the first axis."""
    return stride[0] == 1 and len(subs) > 0


#: the banks of a layer: ``((h, w), ((group, offset), ...))`` per 2-D slice size, rows in order
Banks = tuple[tuple[tuple[int, int], tuple[tuple[int, int], ...]], ...]


@functools.lru_cache(maxsize=1024)
def bank_rows(subs: tuple[SubKernel, ...]) -> Banks:
    """Which 2-D slices each bank's convolution computes, in row order (cached per op set)."""
    banks: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for group, sub in enumerate(subs):
        depth, height, width = sub.size
        for offset in range(depth):
            banks.setdefault((height, width), []).append((group, offset))
    return tuple((size, tuple(rows)) for size, rows in banks.items())


#: where one group's output comes from: ``(group start, group stop, [(bank, bank row start, shift), ...])``
#: with ``out[:, i, ..., start:stop] = sum(bank[:, i + shift, ..., row:row + stop - start])`` (zero outside)
Layout = tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]


@functools.lru_cache(maxsize=1024)
def _layout(subs: tuple[SubKernel, ...], sizes: tuple[int, ...]) -> Layout:
    """The :data:`Layout` of groups ``subs`` of ``sizes`` channels over the banks of :func:`bank_rows`
    (a pure function of the layer, computed once per layer rather than per call)."""
    sources: dict[int, list[tuple[int, int, int]]] = {}  # group -> its (bank, row start, shift)
    for bank, (_, rows) in enumerate(bank_rows(subs)):
        start = 0
        for g, j in rows:
            sources.setdefault(g, []).append((bank, start, j - subs[g].size[0] // 2))
            start += sizes[g]
    starts = list(itertools.accumulate(sizes, initial=0))
    return tuple(
        (starts[g], starts[g + 1], tuple(sorted(sources[g], key=lambda s: abs(s[2]))))  # the centre first
        for g in range(len(subs))
    )


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
    banks: list[Tensor] = []
    for (kh, kw), rows in bank_rows(tuple(subs)):
        weight = torch.cat([weights[g][:, :, j] for g, j in rows]) if len(rows) > 1 else weights[rows[0][0]][:, :, 0]
        y = F.conv2d(frames, weight, stride=stride[1:], padding=(kh // 2, kw // 2))  # (N·T, rows, H', W')
        banks.append(y.view(n, depth, *y.shape[1:]).permute(0, 1, 3, 4, 2))  # (N, T, H', W', rows)
    layout = _layout(tuple(subs), tuple(w.shape[0] for w in weights))
    out = _ShiftSum.apply(layout, *banks)  # (N, T, H', W', C_out)
    if bias is not None:
        out = out + bias
    return out.permute(0, 4, 1, 2, 3)


def _shifted(t: Tensor, shift: int) -> tuple[slice, slice]:
    """Frame slices ``(dst, src)`` with ``dst[i] = src[i + shift]`` for every valid ``i`` of ``t``'s axis 1."""
    depth = t.shape[1]
    if shift >= 0:
        return slice(0, max(depth - shift, 0)), slice(min(shift, depth), depth)
    return slice(min(-shift, depth), depth), slice(0, max(depth + shift, 0))


class _ShiftSum(torch.autograd.Function):
    """Assemble the groups from the bank outputs: a copy of each group's centre rows plus the
    frame-shifted off-centre rows, added in place into one output (no per-group temporaries); the
    backward hands each bank row block its shifted slice of the output gradient (zeros where it fell
    outside the clip)."""

    @staticmethod
    def forward(ctx, layout: Layout, *banks: Tensor) -> Tensor:  # type: ignore[override]
        n, depth, height, width, _ = banks[0].shape
        out = banks[0].new_empty((n, depth, height, width, layout[-1][1]))
        for start, stop, sources in layout:
            target = out[..., start:stop]
            (bank, row, shift), *rest = sources  # sorted: the centre (shift 0) first
            target.copy_(banks[bank][..., row : row + stop - start])
            for bank, row, shift in rest:
                dst, src = _shifted(out, shift)
                target[:, dst] += banks[bank][:, src, ..., row : row + stop - start]
        ctx.layout = layout
        ctx.shapes = [b.shape for b in banks]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grads = [grad_out.new_empty(shape) for shape in ctx.shapes]
        for start, stop, sources in ctx.layout:
            g = grad_out[..., start:stop]
            for bank, row, shift in sources:
                dst, src = _shifted(grad_out, shift)
                block = grads[bank][..., row : row + stop - start]
                block[:, src] = g[:, dst]
                block[:, : src.start].zero_()
                block[:, src.stop :].zero_()
        return None, *grads
