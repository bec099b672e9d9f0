"""Sub-kernel convolution kernels shared by every CAKES operator."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel

Stride = int | tuple[int, int, int]


def as_triple(stride: Stride) -> tuple[int, int, int]:
    """``2 -> (2, 2, 2)``; a 3-sequence passes through (validated)."""
    triple = (stride, stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(triple) != 3 or any(s < 1 for s in triple):
        raise ValueError(f"stride must be a positive int or a 3-tuple of positive ints, got {stride!r}")
    return triple  # type: ignore[return-value]


def subkernel_conv(x: Tensor, weight: Tensor, sub: SubKernel, stride: tuple[int, int, int], groups: int = 1) -> Tensor:
    """Shape-preserving (up to stride) convolution with a ``(out, in/groups, *sub.size)`` weight.

    ``(N, C_in, T, H, W) -> (N, out, T', H', W')``.
    """
    return F.conv3d(x, weight, stride=stride, padding=sub.padding, groups=groups)
