"""Inflation of 2D ``k×k`` ImageNet kernels into 3D sub-kernels (the published CAKES rules).

The 2D kernel lies on the last two axes (H×W); the first axis (T) is new. For a sub-kernel
``A×B×C``:

* each spatial axis shrunk to 1 takes the SUM of the taps along it
  (1x3x3 copies, 3x1x1 sums all 9 spatial taps);
* a full new axis repeats the result ``k`` times and divides by ``k``
  (3x3x3 = repeat along T / k; 3x1x1 = spatial sum repeated / k).

So on a temporally constant input every inflated sub-kernel responds like the 2D filter's
response for 1x3x3/3x3x3 and like its spatial-sum (DC) response for the 1D sub-kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from cakes.ops.subkernel import SubKernel, parse_counts


def inflate_2d(weight: Tensor, subkernel: str | SubKernel) -> Tensor:
    """``(out, in, k, k) -> (out, in, *subkernel.size)`` by the published rules."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"inflate_2d expects a (out, in, k, k) weight, got shape {tuple(weight.shape)}")
    k = weight.shape[2]
    sub = SubKernel.parse(subkernel, k)
    a, b, c = sub.size
    w = weight
    if b == 1:
        w = w.sum(dim=2, keepdim=True)
    if c == 1:
        w = w.sum(dim=3, keepdim=True)
    w = w.unsqueeze(2)  # (out, in, 1, b, c)
    if a == k:
        w = w.repeat(1, 1, k, 1, 1) / k
    return w.contiguous()


def marginal(weight: Tensor, subkernel: str | SubKernel) -> Tensor:
    """``(out, in, k, k, k) -> (out, in, *subkernel.size)``: the sum of a full kernel over every axis
    the sub-kernel drops (1x3x3 sums over T, 3x1x1 over H and W). On an input that is constant along
    the dropped axes it responds exactly like the full kernel. Applied to a kernel inflated to
    ``k×k×k`` by :func:`inflate_2d`, it gives :func:`inflate_2d` of that sub-kernel: the published
    rules are these marginals."""
    if weight.dim() != 5 or len(set(weight.shape[2:])) != 1:
        raise ValueError(f"marginal expects a (out, in, k, k, k) weight, got shape {tuple(weight.shape)}")
    sub = SubKernel.parse(subkernel, weight.shape[2])
    dropped = [2 + axis for axis, size in enumerate(sub.size) if size == 1 and weight.shape[2 + axis] > 1]
    return weight.sum(dim=dropped, keepdim=True) if dropped else weight


def inflate_2d_grouped(weight: Tensor, counts: Mapping[str, int]) -> dict[str, Tensor]:
    """Split a 2D ``(out, in, k, k)`` weight's rows into contiguous groups in ``counts`` order and
    inflate each group into its sub-kernel. Returns ``{sub-kernel name: (n, in, *size)}`` for the
    non-empty groups."""
    k = weight.shape[-1]
    groups = parse_counts(counts, k, where="inflate counts")
    total = sum(n for _, n in groups)
    if total != weight.shape[0]:
        raise ValueError(f"counts {dict(counts)} sum to {total} but the 2D weight has {weight.shape[0]} rows")
    out: dict[str, Tensor] = {}
    start = 0
    for sub, n in groups:
        if n:
            out[sub.name] = inflate_2d(weight[start : start + n], sub)
        start += n
    return out


def tile_input_channels(weight: Tensor, times: int) -> Tensor:
    """Tile a conv weight ``(out, in, ...)`` ``times`` along its input axis, without rescaling
    (the published supernet initialisation of the aggregating conv after a cost-priority op)."""
    return torch.cat([weight] * times, dim=1)
