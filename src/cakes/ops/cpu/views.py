"""2-D views of channels-last 3-D convolutions with unit axes (oneDNN's 2-D kernels are faster)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from cakes.ops.cpu import torch_shim
from cakes.ops.cpu.layout import is_channels_last, uses_onednn
from cakes.ops.subkernel import SubKernel


@dataclass(frozen=True)
class ConvView:
    """How one sub-kernel convolution runs on CPU: as the 3-D convolution it is, or — channels-last
    float32, a size-1 axis pair at stride 1 — as a 2-D one on views of the same memory (oneDNN's
    2-D kernels are 5–15 % faster than its 3-D ones with unit axes):

    * ``frames`` — a ``1xkxk`` kernel at temporal stride 1: ``(N·T, C, H, W)``, kernel ``k x k``;
    * ``pixels`` — a ``kx1x1`` kernel at spatial stride 1: ``(N, C, T, H·W)``, kernel ``k x 1``.

    Channels-last tensors and their channel slices have both views; ``3d`` views are the tensors."""

    kind: str  # "3d" | "frames" | "pixels"
    stride: list[int]
    padding: list[int]

    @staticmethod
    def of(sub: SubKernel, stride: tuple[int, int, int], x: Tensor) -> ConvView:
        """The view for sub-kernel ``sub`` at ``stride`` on input ``x`` ``(N, C_in, T, H, W)``."""
        if is_channels_last(x) and uses_onednn(x):
            if sub.size[0] == 1 and stride[0] == 1:
                return ConvView("frames", list(stride[1:]), list(sub.padding[1:]))
            if sub.size[1:] == (1, 1) and stride[1:] == (1, 1):
                return ConvView("pixels", [stride[0], 1], [sub.padding[0], 0])
        return ConvView("3d", list(stride), list(sub.padding))

    def view(self, t: Tensor) -> Tensor:
        """``(N, C, T, H, W)`` -> the view the convolution runs on."""
        n, c, frames, h, w = t.shape
        if self.kind == "frames":
            return t.transpose(1, 2).view(n * frames, c, h, w)
        return t.view(n, c, frames, h * w) if self.kind == "pixels" else t

    def unview(self, t: Tensor, like: Tensor) -> Tensor:
        """A result -> ``(N, C', T', H', W')``; ``like``: the 5-D input of the convolution (the axes
        a view merges keep their sizes: stride 1)."""
        n, _, _, h, w = like.shape
        if self.kind == "frames":
            return t.view(n, -1, *t.shape[1:]).transpose(1, 2)
        return t.view(*t.shape[:3], h, w) if self.kind == "pixels" else t

    def weight(self, w: Tensor) -> Tensor:
        """``(out, in, 1, k, k) -> (out, in, k, k)``, ``(out, in, k, 1, 1) -> (out, in, k, 1)``."""
        return w[:, :, 0] if self.kind == "frames" else w[:, :, :, :, 0] if self.kind == "pixels" else w

    def unweight(self, g: Tensor) -> Tensor:
        """A gradient of :meth:`weight`'s result -> the 5-D ``(out, in, *sub.size)`` weight's."""
        return g.unsqueeze(2) if self.kind == "frames" else g.unsqueeze(4) if self.kind == "pixels" else g

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """``(N, C_in, T, H, W)`` with ``(out, C_in, *sub.size)`` weight -> ``(N, out, T', H', W')``."""
        conv = F.conv3d if self.kind == "3d" else F.conv2d
        return self.unview(conv(self.view(x), self.weight(w), bias, self.stride, self.padding), x)

    def backward(self, gy: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
        """``convolution_backward``'s input and weight gradients (``None`` where not needed);
        ``x``: only its shape and layout are read when ``need_w`` is false."""
        gi, gw = torch_shim.convolution_backward(
            self.view(gy), self.view(x), self.weight(w), self.stride, self.padding, need_x, need_w
        )
        return (self.unview(gi, x) if need_x else None), (self.unweight(gw) if need_w else None)
