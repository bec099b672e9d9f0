"""1x1x1 convolutions as one matrix product over a channels-last tensor.

A ``(N, C, T, H, W)`` tensor in ``channels_last_3d`` memory is, byte for byte, an ``(N·T·H·W, C)``
matrix, so a 1x1x1 convolution is ``F.linear`` on a permuted view: one GEMM, no copy in or out, and
its backward is two more GEMMs. PyTorch's CPU ``conv3d`` instead sends a batch-1 input with
``C·T·H ≤ 20480`` to its unblocked ``slow_conv3d`` (forward and backward, with contiguous copies
of input and gradient), and otherwise through oneDNN's weight reorders. In ResNet-50 I3D at 8×112²,
batch 1, the network without its slot convolutions trained in 159–172 ms per step with its 1x1x1
convolutions as GEMMs instead of 262–273 ms
(docs/performance.md#pointwise-convolutions-and-instance-norms).

The GEMM can run where :func:`cakes.ops.cpu.switch.channels_last_rewrite_applies` holds (the CPU fast
path's switch on, CPU, no FLOP counter or transform active, a channels-last input, not exporting to
ONNX: the graph keeps a ``Conv``, which onnxruntime fuses with the norm after it); everywhere else it
is the plain ``nn.Conv3d``. A strided convolution takes the strided view of its input first. Where it
can run, the execution plan (:func:`cakes.ops.plan.choose_pointwise`) picks it, the plain
``F.conv3d`` or, in inference, a oneDNN convolution with its weight packed once
(:func:`cakes.ops.cpu.packed.packed_pointwise_conv3d`) per input shape: once PyTorch sends the
convolution to oneDNN (larger inputs, batch 2), oneDNN is the faster for some shapes
(docs/performance.md#pointwise-convolutions-and-instance-norms), and a packed weight saves its
per-call reorder (docs/performance.md#packed-weights-for-inference).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cakes.ops import plan
from cakes.ops.cpu import packed
from cakes.ops.cpu.switch import channels_last_rewrite_applies


class PointwiseConv3d(nn.Conv3d):
    """``nn.Conv3d`` with a 1x1x1 kernel (same parameters, state dict and ``F.conv3d`` values);
    ``(N, C_in, T, H, W) -> (N, C_out, T/s_T, H/s_H, W/s_W)``, a channels-last output for a
    channels-last input."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int | tuple[int, int, int] = 1, bias: bool = False
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not channels_last_rewrite_applies(x, (weight,), bias):
            return super()._conv_forward(x, weight, bias)
        execute = functools.partial(self._execute, x, weight, bias)
        return execute(plan.choose_pointwise(x, weight, bias, self.stride, execute))

    def _execute(self, x: Tensor, weight: Tensor, bias: Tensor | None, execution: str) -> Tensor:
        """One of :data:`cakes.ops.plan.POINTWISE_EXECUTIONS` (``gemm`` | ``conv3d`` | ``packed``) on a
        channels-last CPU input; ``packed`` where it cannot run (:func:`cakes.ops.cpu.packed.applies`)
        runs ``gemm``."""
        if execution == "packed" and packed.applies(x, plan.needs_gradient(x, (weight,), bias)):
            return packed.packed_pointwise_conv3d(x, weight, bias, self.stride)
        if execution == "conv3d":  # PyTorch's slow path returns NCDHW: the next layers get channels-last
            return super()._conv_forward(x, weight, bias).contiguous(memory_format=torch.channels_last_3d)
        st, sh, sw = self.stride
        if (st, sh, sw) != (1, 1, 1):
            x = x[:, :, ::st, ::sh, ::sw]
        rows = F.linear(x.permute(0, 2, 3, 4, 1), weight.flatten(1), bias)  # (N, T, H, W, C_out)
        return rows.permute(0, 4, 1, 2, 3)
