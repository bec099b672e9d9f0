"""Every backbone with every kind of operator factory keeps the written contract of
:mod:`cakes.backbones.base`: built (also on the meta device), run forward and backward on a tiny
input, the output shape right, and the slots built exactly those ``slots()`` states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from cakes.backbones import C2FNAS, ResNet3d
from cakes.backbones.base import Backbone, InflatableBackbone, SlotBuilder, scaled_width
from cakes.ops import ConvNorm, CostPriority, Derived, Homogeneous, OperatorFactory, PerformancePriority, Uniform
from cakes.ops.arch import Arch
from cakes.ops.factory import uniform_counts
from cakes.ops.search import SearchSlot
from cakes.ops.subkernel import resolve_op_set


@dataclass(frozen=True)
class Case:
    """A tiny backbone: its class, size arguments, an op set it supports, a homogeneous kind, the
    input and the expected output shape."""

    backbone: type[nn.Module]
    sizes: dict[str, Any]
    op_set: str
    homogeneous: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


CASES = {
    "resnet3d": Case(ResNet3d, {"depth": 50, "width": 0.125}, "c123d", "c3d", (2, 3, 4, 32, 32), (2, 5)),
    "c2fnas": Case(C2FNAS, {"width": 0.125}, "v123d", "c3d", (1, 1, 32, 32, 32), (1, 5, 32, 32, 32)),
}


def derived(case: Case) -> OperatorFactory:
    """A found architecture for ``case``: every slot's channels split evenly over the op set."""
    op_set = resolve_op_set(case.op_set)
    layers = {name: uniform_counts(op_set, width) for name, width in case.backbone.slots(**case.sizes).items()}
    return Derived(Arch(backbone=case.backbone.name, op_set=case.op_set, layers=layers))


OPERATORS: dict[str, Callable[[Case], OperatorFactory]] = {
    "homogeneous": lambda case: Homogeneous(case.homogeneous),
    "uniform": lambda case: Uniform(case.op_set),
    "derived": derived,
    "cost_priority": lambda case: CostPriority(case.op_set),
    "performance_priority": lambda case: PerformancePriority(case.op_set),
}


def build(case: Case, operator: str) -> nn.Module:
    return case.backbone(operator=OPERATORS[operator](case), num_classes=5, **case.sizes)


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("backbone", sorted(CASES))
def test_backbone_builds_runs_and_keeps_the_slot_contract(backbone: str, operator: str) -> None:
    case = CASES[backbone]
    torch.manual_seed(0)
    net = build(case, operator)
    assert isinstance(net, Backbone)
    assert net.num_classes == 5 and net.name == backbone
    assert net.built_slots == case.backbone.slots(**case.sizes)
    assert list(net.built_slots) == list(case.backbone.slots(**case.sizes))
    slots = [m for m in net.modules() if isinstance(m, (ConvNorm, SearchSlot))]
    assert len(slots) == len(net.built_slots)
    assert all(s.norm.weight is not None for s in slots), "slot norms must be affine"
    if operator == "cost_priority":
        assert all(s.out_channels == len(s.op_set) * w for s, w in zip(slots, net.built_slots.values(), strict=True))

    net.train()
    out = net(torch.randn(*case.input_shape))
    assert out.shape == case.output_shape
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in (net.fc if backbone == "resnet3d" else net.head).parameters())


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("backbone", sorted(CASES))
def test_backbone_builds_on_the_meta_device(backbone: str, operator: str) -> None:
    case = CASES[backbone]
    with torch.device("meta"):
        net = build(case, operator)
    assert all(p.is_meta for p in net.parameters())
    assert net.built_slots == case.backbone.slots(**case.sizes)


def test_only_resnet3d_has_the_inflation_hook() -> None:
    assert isinstance(build(CASES["resnet3d"], "homogeneous"), InflatableBackbone)
    assert not isinstance(build(CASES["c2fnas"], "homogeneous"), InflatableBackbone)


def test_slot_builder_refuses_slots_that_differ_from_slots() -> None:
    norm = nn.BatchNorm3d
    builder = SlotBuilder(Homogeneous("c3d"), "toy", {"a": 4, "b.op0": 4})
    builder(layer="a", in_channels=2, out_channels=4, norm=norm)
    with pytest.raises(ValueError, match="slot 'a' built twice"):
        builder(layer="a", in_channels=2, out_channels=4, norm=norm)
    with pytest.raises(ValueError, match=r"slot 'b.op0' with 8 output channels is not in slots\(\)"):
        builder(layer="b.op0", in_channels=2, out_channels=8, norm=norm)
    with pytest.raises(ValueError, match=r"slots\(\) does not match the slots built \(not built: \['b.op0'\]"):
        builder.finish()
    builder(layer="b.op0", in_channels=4, out_channels=4, norm=norm)
    assert builder.finish() == {"a": 4, "b.op0": 4}


def test_scaled_width_rounds_and_keeps_one_channel() -> None:
    assert [scaled_width(64, w) for w in (1.0, 0.125, 0.3, 0.001)] == [64, 8, 19, 1]
