"""Time-split execution: a batch-1 clip as a batch of two halves along the first axis, halo included.

PyTorch sends a CPU ``conv3d`` whose input has batch 1 and ``C·T·H ≤ 20480`` to its unblocked
``slow_conv3d`` (forward and backward) instead of oneDNN — every slot convolution of ResNet-50 I3D
at 8×112², batch 1 (``planes·T·H = 14336``) — and that path ran C3D's layers 1.06–5.2× slower than
this execution (docs/performance.md#batch-1-cpu-convolutions-frame-wise-and-time-split-executions).
Splitting the clip into its two halves along time and stacking them as a batch of 2 computes the
same convolution on oneDNN's path: a group with a full temporal kernel reads each half with its
``k // 2`` neighbouring frames (the halo, zeros outside the clip) and is run without temporal
padding; a group with a unit temporal kernel reads the halves as they are (a free view of a
channels-last clip). The outputs of the two halves, in channels-last memory, are already the
clip's frames in order.

Needs unit stride and an even length along the first axis; MACs are exactly the groups'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel


def supports(x: Tensor, stride: tuple[int, int, int]) -> bool:
    """Whether :func:`time_split_conv3d` can run this input: unit stride and an even length along time."""
    return stride[0] == 1 and x.dim() == 5 and x.shape[2] % 2 == 0 and x.shape[2] >= 2


def time_split_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
) -> Tensor:
    """Same function as :func:`~cakes.ops.reference.grouped_conv3d` (values and gradients), run on the halves.

    ``x``: ``(N, C_in, T, H, W)`` with ``T`` even; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``.
    Output ``(N, C_out, T, H', W')`` in channels-last memory, channels in group order.
    """
    if not supports(x, stride):
        raise ValueError(
            f"time-split execution needs stride 1 and an even length along the first axis, "
            f"got stride {stride} and input shape {tuple(x.shape)}"
        )
    n, c_in, depth, height, width = x.shape
    half = depth // 2
    frames_last = x.permute(0, 2, 3, 4, 1)  # (N, T, H, W, C): a view of a channels-last clip
    halves: dict[int, Tensor] = {}  # temporal kernel size -> (2N, C, half + 2·pad, H, W)

    def halves_for(kt: int) -> Tensor:
        if kt not in halves:
            pad = kt // 2
            source = F.pad(frames_last, (0, 0, 0, 0, 0, 0, pad, pad)) if pad else frames_last
            stacked = torch.stack([source[:, : half + 2 * pad], source[:, half:]], 1)  # (N, 2, half+2pad, H, W, C)
            halves[kt] = stacked.reshape(2 * n, half + 2 * pad, height, width, c_in).permute(0, 4, 1, 2, 3)
        return halves[kt]

    outputs = []
    for weight, sub in zip(weights, subs, strict=True):
        padding = (0, *sub.padding[1:])
        y = F.conv3d(halves_for(sub.size[0]), weight, stride=stride, padding=padding)  # (2N, n_g, half, H', W')
        outputs.append(y.permute(0, 2, 3, 4, 1).reshape(n, depth, *y.shape[3:], y.shape[1]))  # (N, T, H', W', n_g)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)
    if bias is not None:
        out = out + bias
    return out.permute(0, 4, 1, 2, 3)
