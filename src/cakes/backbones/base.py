"""The contract between a backbone and the operator factory that builds its replaceable convs.

A *slot* is a replaceable convolution followed by its normalisation; the operator factory
(:class:`cakes.ops.factory.OperatorFactory`) decides what is inside (a homogeneous conv, a CAKES
conv with found or uniform counts, a supernet slot). Rules a backbone follows — each is relied on
somewhere else in the project:

1. **Keyword-only constructor with an ``operator``**: ``Backbone(*, operator, ..., num_classes)``;
   every other argument has a default. Configs build it through :mod:`cakes.builders`, so its
   ``_target_`` must be listed in :data:`cakes.builders.NETWORK_BUILDERS`.
2. **``name`` and ``num_classes``**: a class attribute ``name`` (the backbone name arch files carry,
   e.g. ``resnet3d``) and the attribute ``num_classes``.
3. **``slots()``**: a static method returning ``{slot name: output width}`` in module order, a pure
   function of the constructor's size arguments (``check_arch`` calls it on the class, before
   anything is built, to validate an arch file).
4. **Dotted slot names**, unique, following the module hierarchy: the path of the block that holds
   the slot, plus the slot's own name when a block holds more than one (``layer1.0`` for a
   bottleneck, ``layer1.0.conv1`` for a basic block, ``c1.op0``). Arch files list them, ``PerLayer``
   keys match dotted prefixes of them, the pruning export and the weight inheritance name them.
5. **``bind()`` once, then keyword-only factory calls**: wrap the factory in a :class:`SlotBuilder`
   (which calls ``operator.bind(name, slots())`` — validation hook, e.g. an arch's layers against
   the slots) and build every slot with ``slot_builder(layer=..., in_channels=..., out_channels=...,
   norm=..., stride=...)``; :meth:`SlotBuilder.finish` checks that exactly the slots of ``slots()``
   were built, with the widths it states, and the backbone keeps the result as ``built_slots``.
6. **``slot.out_channels`` sizes what follows**: a cost-priority supernet slot emits ``n·C``
   channels (one group per sub-kernel); the layer after a slot must take ``slot.out_channels``
   inputs (an aggregating conv), never the ``out_channels`` asked for.
7. **Affine slot norms**: the ``norm`` factory passed for a slot builds an affine norm
   (``BatchNorm3d``, ``InstanceNorm3d(affine=True)``): a supernet slot's ``γ`` are its path weights.
8. **The inflation hook**: a backbone that initialises from 2D ImageNet weights does so with
   ``load_imagenet`` (:class:`InflatableBackbone`) and lets each slot inflate its own conv and norm
   with ``slot.inflate_from_2d(weight_2d, norm_state)``; it never looks inside a slot.
9. **Meta-device buildable**: construction allocates and initialises tensors only through
   ``torch.nn`` modules and ``nn.init`` (no ``.item()``, no data-dependent Python branches on
   weights), so ``with torch.device("meta"):`` builds a full-size network for counting
   (:func:`cakes.profile.main`).

``tests/test_backbones_contract.py`` checks every backbone against these rules with every kind of
operator factory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from cakes.ops.factory import NormFactory, OperatorFactory
from cakes.ops.subkernel import Stride


def scaled_width(channels: int, width: float) -> int:
    """``channels`` times the width multiplier ``width``, rounded, at least 1."""
    return max(1, int(round(channels * width)))


class SlotBuilder:
    """The operator factory as one backbone build sees it: bound to the backbone's slots on
    creation, then called once per slot; records the slots it built (rule 5 of the module docstring).

    ``(layer, in_channels, out_channels, norm, stride) -> slot`` with ``slot.out_channels`` the width
    it really emits.
    """

    def __init__(self, operator: OperatorFactory, backbone: str, slots: Mapping[str, int]) -> None:
        self.operator, self.backbone = operator, backbone
        self.expected = dict(slots)
        self.built: dict[str, int] = {}
        operator.bind(backbone, self.expected)

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        if layer in self.built:
            raise ValueError(f"{self.backbone}: slot {layer!r} built twice")
        if self.expected.get(layer) != out_channels:
            raise ValueError(
                f"{self.backbone}: slot {layer!r} with {out_channels} output channels is not in "
                f"slots() (which gives {self.expected.get(layer)})"
            )
        self.built[layer] = out_channels
        return self.operator(layer=layer, in_channels=in_channels, out_channels=out_channels, norm=norm, stride=stride)

    def finish(self) -> dict[str, int]:
        """The slots built ``{name: width}`` in build order; ``ValueError`` unless they are exactly
        those of ``slots()``, in its order."""
        if list(self.built.items()) != list(self.expected.items()):
            missing = [n for n in self.expected if n not in self.built]
            raise ValueError(
                f"{self.backbone}: slots() does not match the slots built (not built: {missing}; "
                f"order built: {list(self.built)})"
            )
        return dict(self.built)


@dataclass
class InflationReport:
    """What ImageNet initialisation did, by parameter name."""

    loaded: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)  # model params no source key fed
    dropped: list[str] = field(default_factory=list)  # source keys deliberately unused (the 1000-way fc)

    def summary(self) -> str:
        return (
            f"ImageNet init: {len(self.loaded)} source tensors loaded, {len(self.dropped)} dropped "
            f"({', '.join(self.dropped) or 'none'}); kept random: {', '.join(self.random_init) or 'none'}"
        )


@runtime_checkable
class Backbone(Protocol):
    """What every backbone offers (see the module docstring for the rules behind each member)."""

    #: the backbone name arch files carry
    name: ClassVar[str]
    #: classes of the output (logits per clip or per voxel)
    num_classes: int
    #: ``{slot name: output width}`` of the slots this instance built, in build order
    built_slots: dict[str, int]

    @staticmethod
    def slots(**sizes: Any) -> dict[str, int]:
        """``{slot name: output width}`` in module order, from the constructor's size arguments."""

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, ...) -> logits``."""


@runtime_checkable
class InflatableBackbone(Backbone, Protocol):
    """A backbone with ImageNet initialisation (rule 8): 2D weights inflated slot by slot."""

    def load_imagenet(self, source: str | Path | Mapping[str, Tensor]) -> InflationReport:
        """Initialise from a torchvision-format 2D state dict; every source key used or named."""
