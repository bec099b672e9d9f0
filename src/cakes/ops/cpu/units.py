"""Work planning of the CPU fast path: which output rows each convolution or matrix-product call computes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.cpu.layout import uses_onednn
from cakes.ops.subkernel import SubKernel


def runs_as_matmul(sub: SubKernel, stride: tuple[int, int, int]) -> bool:
    """``kx1x1`` / ``1x1x1`` groups at temporal stride 1: their weight gradient (and, where oneDNN does
    not take them, forward and input gradient) runs as shifted matrix products."""
    return sub.size[1] == 1 and sub.size[2] == 1 and stride[0] == 1


@dataclass(frozen=True)
class Unit:
    """Output rows ``[start, stop)`` computed by one call: a convolution with kernel ``sub``, or (``matmul``,
    see :func:`runs_as_matmul`) shifted matrix products for a ``kx1x1`` sub-kernel. ``parts``: the
    ``(group, first row, end row)`` weight rows it covers, in order; a convolution may end with leading
    rows of the next group whose sub-kernel it contains (zero-padded into its kernel)."""

    sub: SubKernel
    matmul: bool
    start: int
    stop: int
    parts: tuple[tuple[int, int, int], ...]


def contains(outer: SubKernel, inner: SubKernel) -> bool:
    """Every axis of ``inner`` fits inside ``outer`` (both centred)."""
    return all(i <= o for o, i in zip(outer.size, inner.size, strict=True))


def fill_block(x: Tensor) -> int:
    """oneDNN computes convolutions in blocks of 16 (AVX-512) or 8 output channels, so a group of 85
    costs about as much as one of 96. Returns that block when it applies, else 0."""
    if not uses_onednn(x):
        return 0
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def plan_units(subs: Sequence[SubKernel], sizes: Sequence[int], stride: tuple[int, int, int], block: int) -> list[Unit]:
    """One unit per group (``sizes[j]`` rows of sub-kernel ``subs[j]``); with ``block``, a convolution's
    last partial block is filled with the leading channels of the next group when its sub-kernel is
    contained (computed for free there)."""
    units: list[Unit] = []
    taken = [0] * len(subs)
    start = 0
    for j, (sub, n) in enumerate(zip(subs, sizes, strict=True)):
        lo = taken[j]
        if lo >= n:
            continue
        matmul = runs_as_matmul(sub, stride)
        parts = [(j, lo, n)]
        stop = start + n - lo
        if block and not matmul and j + 1 < len(subs) and contains(sub, subs[j + 1]):
            r = min(-(n - lo) % block, sizes[j + 1])
            if r:
                parts.append((j + 1, 0, r))
                taken[j + 1] = r
                stop += r
        units.append(Unit(sub, matmul, start, stop, tuple(parts)))
        start = stop
    return units


def unit_weight(unit: Unit, weights: Sequence[Tensor], subs: Sequence[SubKernel]) -> Tensor:
    """The ``(stop - start, C_in, *unit.sub.size)`` weight of a unit: its parts' rows, zero-padded to its kernel."""
    pieces = []
    for j, lo, hi in unit.parts:
        w = weights[j] if (lo, hi) == (0, weights[j].shape[0]) else weights[j][lo:hi]
        if subs[j].size != unit.sub.size:
            pads: list[int] = []
            # F.pad: last axis first
            for big, small in zip(reversed(unit.sub.size), reversed(subs[j].size), strict=True):
                pads += [(big - small) // 2] * 2
            w = F.pad(w, pads)
        pieces.append(w)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def scatter_weight_grad(
    unit: Unit,
    g: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    gws: list[Tensor | None],
    need_w: Sequence[bool],
) -> None:
    """Unit weight gradient ``g`` (shaped like :func:`unit_weight`) -> the per-group gradients ``gws``
    (centre slices of the padded rows; groups without ``need_w`` skipped)."""
    r = 0
    for j, lo, hi in unit.parts:
        piece = g[r : r + hi - lo]
        r += hi - lo
        if not need_w[j]:
            continue
        if subs[j].size != unit.sub.size:
            centre = (slice((b - s) // 2, (b - s) // 2 + s) for b, s in zip(unit.sub.size, subs[j].size, strict=True))
            piece = piece[(slice(None), slice(None), *centre)]
        if (lo, hi) == (0, weights[j].shape[0]):
            gws[j] = piece.contiguous()
        else:
            if gws[j] is None:
                gws[j] = torch.empty_like(weights[j])
            gws[j][lo:hi] = piece
