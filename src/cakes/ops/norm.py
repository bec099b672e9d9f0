"""Instance norm that keeps a channels-last volume channels-last.

PyTorch's ``instance_norm`` reshapes its input to ``(1, N·C, D, H, W)`` and runs a batch norm on it,
which first makes a channels-last input contiguous (NCDHW) and returns NCDHW: every norm of a
channels-last C2FNAS copied its input, and the ReLU and convolution after it then ran on the other
layout (mixed-layout element-wise ops, and a copy back for the convolution), forward and backward.
The same statistics come without a layout change from

* ``F.batch_norm`` in training mode without running statistics, for one sample (a batch norm over
  ``(N, D, H, W)`` with ``N = 1`` is the instance norm of that sample), and
* ``F.group_norm`` with one group per channel, for a batch of several;

both have channels-last CPU kernels. On a channels-last 32×64³ input (forward + backward, with the
ReLU after it) that is 45 ms instead of 95 ms (docs/performance.md#pointwise-convolutions-and-instance-norms).

The rewrite runs for a norm without running statistics where
:func:`cakes.ops.cpu.switch.channels_last_rewrite_applies` holds (fast path on, a channels-last CPU input,
not exporting to ONNX: the graph keeps ``InstanceNormalization``); everywhere else it is
``nn.InstanceNorm3d``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from cakes.ops.cpu.switch import channels_last_rewrite_applies


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` (same arguments, parameters, state dict and values);
    ``(N, C, D, H, W) -> (N, C, D, H, W)`` in the input's memory format."""

    def forward(self, x: Tensor) -> Tensor:
        if not self._keeps_layout(x):
            return super().forward(x)
        if x.shape[0] == 1:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)

    def _keeps_layout(self, x: Tensor) -> bool:
        params, bias = ((self.weight,), self.bias) if self.affine else ((), None)
        return not self.track_running_stats and channels_last_rewrite_applies(x, params, bias)
