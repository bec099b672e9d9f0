"""Operator factories: what a backbone receives to build each replaceable convolution.

A slot is "replaceable convolution followed by its normalisation". A backbone lists its slots
``{layer name: output width}``, calls :meth:`OperatorFactory.bind` once with them, then calls the
factory for every slot with the norm it uses::

    slot = factory(layer="layer1.0", in_channels=64, out_channels=64, stride=(1, 1, 1),
                   norm=nn.BatchNorm3d)
    slot.out_channels   # the width it really emits (n·C_out for a cost-priority supernet op)
    slot.norm           # its normalisation layer (path weights |γ| for search-time ops)

The backbone never knows which sub-kernels are inside; it only reads ``slot.out_channels`` to size
what follows, and calls ``slot.inflate_from_2d(weight, norm_state)`` for ImageNet initialisation.
The whole contract on the backbone's side (binding and recording through a ``SlotBuilder``) is
written in :mod:`cakes.backbones.base`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from cakes.ops.arch import Arch, load_arch
from cakes.ops.conv import CakesConv3d
from cakes.ops.homogeneous import HOMOGENEOUS_OPS, HomogeneousConv3d
from cakes.ops.subkernel import OpSet, Stride, resolve_op_set

NormFactory = Callable[[int], nn.Module]


class ConvNorm(nn.Module):
    """A fixed (retrain-time) slot: ``conv`` then ``norm``.

    ``(N, C_in, T, H, W) -> (N, C_out, T', H', W')``.
    """

    #: the norm follows the conv: folded into it for inference (:func:`cakes.ops.fold.fold_batch_norms`)
    CONV_NORM_PAIRS = (("conv", "norm"),)

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm
        self.out_channels: int = conv.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))

    def inflate_from_2d(self, weight: Tensor, norm_state: Mapping[str, Tensor]) -> list[str]:
        """Load a 2D ImageNet conv weight ``(out, in, k, k)`` by the inflation rules and its BN;
        returns the names of the tensors set."""
        loaded = [f"conv.{n}" for n in self.conv.inflate_from_2d(weight)]
        self.norm.load_state_dict(dict(norm_state))
        return loaded + [f"norm.{n}" for n in norm_state]


class OperatorFactory:
    """Base class: builds the op of one slot. Subclasses implement :meth:`__call__`."""

    #: the search mode this factory belongs to (``None`` for fixed, retrain-time operators)
    search_mode: str | None = None

    def bind(self, backbone: str, slots: Mapping[str, int]) -> None:
        """Called once by the backbone with its slots before any op is built (validation hook)."""

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        raise NotImplementedError


class Homogeneous(OperatorFactory):
    """Every slot gets the same named recipe (``c2d``, ``c3d``, ``p3d``, ``ir_csn``, ``ip_csn``,
    ``d21d``, ``vol2d``, ``volp3d``; see :mod:`cakes.ops.homogeneous`)."""

    def __init__(self, kind: str) -> None:
        if kind not in HOMOGENEOUS_OPS:
            raise ValueError(f"unknown operator {kind!r}; known: {sorted(HOMOGENEOUS_OPS)}")
        self.kind = kind

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        return ConvNorm(HomogeneousConv3d(in_channels, out_channels, self.kind, stride), norm(out_channels))

    def __repr__(self) -> str:
        return f"Homogeneous({self.kind!r})"


class Derived(OperatorFactory):
    """Each slot gets a :class:`CakesConv3d` with the counts a found architecture gives it.

    ``arch`` is a path to an arch yaml, a composed mapping (e.g. Hydra's ``cfg.arch``) or an
    :class:`Arch`; it is read as plain data and validated against the backbone in :meth:`bind`.
    """

    def __init__(self, arch: str | Mapping[str, Any] | Arch) -> None:
        self.arch = load_arch(arch)
        self._bound = False

    def bind(self, backbone: str, slots: Mapping[str, int]) -> None:
        self.arch.check_backbone(backbone, slots)
        self._bound = True

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        if not self._bound:
            raise RuntimeError("Derived operator factory used before bind(): the backbone must call bind() first")
        conv = CakesConv3d(in_channels, self.arch.layers[layer], stride=stride)
        if conv.out_channels != out_channels:  # bind() checked the sums; a backbone bug otherwise
            raise RuntimeError(f"layer {layer!r}: arch gives {conv.out_channels} channels, slot has {out_channels}")
        return ConvNorm(conv, norm(out_channels))

    def __repr__(self) -> str:
        return f"Derived(backbone={self.arch.backbone!r}, op_set={self.arch.op_set!r}, layers={len(self.arch.layers)})"


def uniform_counts(op_set: OpSet, channels: int) -> dict[str, int]:
    """Split ``channels`` over the op set's sub-kernels as evenly as possible (earlier ones get
    the remainder), in op-set order."""
    base, extra = divmod(channels, len(op_set))
    return {name: base + (i < extra) for i, name in enumerate(op_set.names)}


class Uniform(OperatorFactory):
    """The paper's manual setting: every slot is a :class:`CakesConv3d` whose channels are split
    evenly over the op set's sub-kernels (e.g. ``c12d`` at 64 channels: 32 × 1x3x3, 32 × 3x1x1)."""

    def __init__(self, op_set: str | list[str] | Mapping[str, Any]) -> None:
        self.op_set = resolve_op_set(op_set)

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        conv = CakesConv3d(in_channels, uniform_counts(self.op_set, out_channels), stride=stride)
        return ConvNorm(conv, norm(out_channels))

    def __repr__(self) -> str:
        return f"Uniform({self.op_set.name!r})"
