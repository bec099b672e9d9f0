"""Homogeneous operators: every output channel uses the same (possibly factorised) kernel.

All of them are built from one primitive, :class:`SubKernelConv3d`, and share the constructor
shape ``(in_channels, out_channels, stride)`` so a backbone receives any of them from a factory.
The named recipes (:data:`HOMOGENEOUS_OPS`) cover the baselines of the CAKES paper:

========  ==============================================  ==========================
name      steps                                           meaning
========  ==============================================  ==========================
c2d       1x3x3                                           2D per frame (video)
c3d       3x3x3                                           full 3D
p3d       1x3x3 → 3x1x1 (no norm between)                 pseudo-3D (video)
ir_csn    3x3x3 depthwise                                 interaction-reduced CSN
ip_csn    1x1x1 → 3x3x3 depthwise                         interaction-preserved CSN
d21d      1x3x3 depthwise → 3x1x1 depthwise                D(2+1)D as in VoV3D
vol2d     3x3x1                                           2D per slice (volumes)
volp3d    3x3x1 → 1x1x3 (no norm between)                 pseudo-3D (volumes)
========  ==============================================  ==========================

"Depthwise" uses ``groups = gcd(in, out)``, which is depthwise when ``in == out`` (the case in a
bottleneck) and stays defined when the widths differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cakes.ops import plan
from cakes.ops.inflate import inflate_2d
from cakes.ops.reference import subkernel_conv
from cakes.ops.subkernel import Stride, SubKernel, as_triple


class SubKernelConv3d(nn.Module):
    """One convolution with a single sub-kernel, shape-preserving padding and optional groups.

    ``(N, in_channels, T, H, W) -> (N, out_channels, T', H', W')``; weight ``(out, in/groups, *size)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        subkernel: str | SubKernel = "3x3x3",
        stride: Stride = 1,
        groups: int = 1,
        bias: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.subkernel = SubKernel.parse(subkernel, kernel_size)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.stride = as_triple(stride)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.subkernel.size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform as ``nn.Conv3d`` (and every :class:`CakesConv3d` group) does, so that
        all slot ops start alike when training from scratch."""
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / self.weight[0].numel() ** 0.5, 1 / self.weight[0].numel() ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in, T, H, W) -> (N, out, T', H', W')``. A dense (``groups=1``) conv is a one-group
        heterogeneous conv and runs the execution :mod:`cakes.ops.plan` picks for it, exactly as
        :class:`~cakes.ops.conv.CakesConv3d` layers do: baselines and CAKES networks get the same choices."""
        if self.groups == 1:
            return plan.run(x, [self.weight], [self.subkernel], self.stride, self.bias, self.subkernel.k)
        out = subkernel_conv(x, self.weight, self.subkernel, self.stride, self.groups)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)

    def inflate_from_2d(self, weight: Tensor) -> list[str]:
        """Load a 2D ``(out, in, k, k)`` ImageNet kernel by the inflation rules (dense convs only)."""
        if self.groups != 1:
            raise ValueError(
                f"{self.subkernel.name} conv with groups={self.groups} has no ImageNet mapping from a dense 2D kernel"
            )
        inflated = inflate_2d(weight, self.subkernel)
        if inflated.shape != self.weight.shape:
            raise ValueError(f"2D weight {tuple(weight.shape)} does not fit conv weight {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(inflated)
        return ["weight"]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, subkernel={self.subkernel.name}, stride={self.stride}" + (
            f", groups={self.groups}" if self.groups != 1 else ""
        )


@dataclass(frozen=True)
class Step:
    """One convolution of a homogeneous recipe."""

    subkernel: str
    depthwise: bool = False


#: Named homogeneous recipes; each is a sequence of convolutions with no norm between them.
HOMOGENEOUS_OPS: dict[str, tuple[Step, ...]] = {
    "c2d": (Step("1x3x3"),),
    "c3d": (Step("3x3x3"),),
    "p3d": (Step("1x3x3"), Step("3x1x1")),
    "ir_csn": (Step("3x3x3", depthwise=True),),
    "ip_csn": (Step("1x1x1"), Step("3x3x3", depthwise=True)),
    "d21d": (Step("1x3x3", depthwise=True), Step("3x1x1", depthwise=True)),
    "vol2d": (Step("3x3x1"),),
    "volp3d": (Step("3x3x1"), Step("1x1x3")),
}


class HomogeneousConv3d(nn.Sequential):
    """A recipe of :class:`SubKernelConv3d` steps, ``in_channels -> out_channels``.

    The first step takes the stride and maps ``in -> out``; later steps map ``out -> out``.
    ``(N, in_channels, T, H, W) -> (N, out_channels, T', H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str, stride: Stride = 1) -> None:
        if kind not in HOMOGENEOUS_OPS:
            raise ValueError(f"unknown homogeneous operator {kind!r}; known: {sorted(HOMOGENEOUS_OPS)}")
        steps = []
        width = in_channels
        for i, step in enumerate(HOMOGENEOUS_OPS[kind]):
            groups = math.gcd(width, out_channels) if step.depthwise else 1
            steps.append(SubKernelConv3d(width, out_channels, step.subkernel, stride if i == 0 else 1, groups))
            width = out_channels
        for later in steps[1:]:  # never inflated from ImageNet (P3D's temporal conv): the authors' rule for
            nn.init.kaiming_normal_(later.weight, mode="fan_out", nonlinearity="relu")  # new convs
        super().__init__(*steps)
        self.kind = kind
        self.in_channels, self.out_channels = in_channels, out_channels

    def inflate_from_2d(self, weight: Tensor) -> list[str]:
        """ImageNet initialisation: the first step takes the inflated 2D kernel; later steps
        (e.g. P3D's temporal conv) keep their Kaiming-normal (fan_out) initialisation."""
        return [f"0.{n}" for n in self[0].inflate_from_2d(weight)]

    def extra_repr(self) -> str:
        return f"kind={self.kind}"
