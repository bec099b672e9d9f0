"""Reference (plain) executions of a heterogeneous convolution: one ``F.conv3d`` per sub-kernel group.

* :func:`subkernel_conv` — one sub-kernel: a plain ``F.conv3d`` with shape-preserving padding;
* :func:`grouped_conv3d` — every group, concatenated along channels, plus bias (the ``grouped``
  execution of :mod:`cakes.ops.plan`, and what :func:`~cakes.ops.cpu.function.cakes_conv3d` runs
  wherever the CPU fast path does not);
* :func:`dense_weight` — the same op as one zero-padded ``kxkxk`` weight (C3D's cost).

These run anywhere (any device, dtype, dispatch mode or ``torch.func`` transform), so counters see
the ``aten.convolution`` calls of the closed-form MAC count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel


def subkernel_conv(x: Tensor, weight: Tensor, sub: SubKernel, stride: tuple[int, int, int], groups: int = 1) -> Tensor:
    """Shape-preserving (up to stride) convolution with a ``(out, in/groups, *sub.size)`` weight.

    ``(N, C_in, T, H, W) -> (N, out, T', H', W')``.
    """
    return F.conv3d(x, weight, stride=stride, padding=sub.padding, groups=groups)


def grouped_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    out_index: Tensor | None = None,
) -> Tensor:
    """``cat([subkernel_conv(x, w, sub, stride) for w, sub in zip(weights, subs)], 1) + bias``.

    ``x``: ``(N, C_in, T, H, W)``; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``; ``bias``: ``(C_out,)``
    per output channel. Output ``(N, C_out, T', H', W')``, channels in group order, or with
    ``out_index`` (a ``(C_out,)`` permutation) row ``r`` of the group order at channel ``out_index[r]``.
    """
    outputs = [subkernel_conv(x, w, sub, stride) for w, sub in zip(weights, subs, strict=True)]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if out_index is not None:
        out = out.index_select(1, torch.argsort(out_index))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


def dense_weight(weights: Sequence[Tensor], subs: Sequence[SubKernel], kernel_size: int) -> Tensor:
    """The equivalent zero-padded ``(C_out, C_in, k, k, k)`` weight of the groups (differentiable):
    ``grouped_conv3d(x, weights, subs, s, None) == F.conv3d(x, dense_weight(...), stride=s, padding=k // 2)``.

    ``weights[i]``: ``(n_i, C_in, *subs[i].size)``."""
    rows = []
    for w, sub in zip(weights, subs, strict=True):
        pads: list[int] = []
        for s in reversed(sub.size):  # F.pad lists the last axis first
            pads += [(kernel_size - s) // 2, (kernel_size - s) // 2]
        rows.append(F.pad(w, pads))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
