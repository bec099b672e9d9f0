"""C2FNAS backbone: published counts through the configs, slots, every operator kind, arch validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cakes.ops.arch import ArchError
from cakes.backbones import C2FNAS
from cakes.config import compose_config, input_shape_from_config
from cakes.builders import build_network
from cakes.ops import CostPriority, CostPrioritySlot, Derived, Homogeneous, PerformancePriority, Uniform
from cakes.ops.per_layer import PerLayer
from cakes.profile import profile

# params, light-head GMACs at 96³ (docs/c2fnas.md#counts: the published params; MACs = conv MACs,
# 0.75 G below the published FLOPs)
COUNTS = {
    "3d": (22.50e6, 187.73),
    "2d": (11.29e6, 97.02),
    "p3d": (13.16e6, 112.14),
    "panc": (17.02e6, 150.02),
}
# the reference note said "16 OP convs", but its own list (one in c0 c2 c3 c4 c5 c7 c10, two in c1 c6 c8 c9 c11)
# and its 16.810M all-3D OP parameters are 17 convs (docs/c2fnas.md#op-slots)
SLOT_NAMES = [
    "c0.op0",
    "c1.op0",
    "c1.op1",
    "c2.op0",
    "c3.op0",
    "c4.op0",
    "c5.op0",
    "c6.op0",
    "c6.op1",
    "c7.op0",
    "c8.op0",
    "c8.op1",
    "c9.op0",
    "c9.op1",
    "c10.op0",
    "c11.op0",
    "c11.op1",
]
TINY = 0.125


def test_published_counts_through_the_experiment_configs():
    for variant, (params, gmacs) in COUNTS.items():
        cfg = compose_config("train", [f"experiment=msd_c2fnas_{variant}"])
        with torch.device("meta"):
            net = build_network(cfg.model.net, pretrained=False)
        prof = profile(net, input_shape_from_config(cfg))
        assert prof.input_shape == (1, 1, 96, 96, 96)
        assert prof.params == pytest.approx(params, abs=0.01e6), variant
        assert prof.macs / 1e9 == pytest.approx(gmacs, rel=1e-4), variant


def test_concat_head_and_width_multiplier():
    with torch.device("meta"):
        light = C2FNAS(operator=Homogeneous("c3d"))
        concat = C2FNAS(operator=Homogeneous("c3d"), head="concat")
        half = C2FNAS(operator=Homogeneous("c3d"), width=0.5)
    shape = (1, 1, 96, 96, 96)
    assert profile(concat, shape).macs / 1e9 == pytest.approx(230.54, abs=0.01)
    extra = 27 * 128 * 64 + 27 * 64 * 32 + 2 * 64 - (27 * 64 * 32 + 27 * 32 * 32 + 2 * 32)
    assert profile(concat, shape).params - profile(light, shape).params == extra
    assert profile(half, shape).macs == pytest.approx(profile(light, shape).macs / 4, rel=0.01)


def test_slots_are_the_op_convs_named_like_their_modules():
    assert list(C2FNAS.slots()) == SLOT_NAMES
    op_params = sum(27 * w * w for w in C2FNAS.slots().values())
    assert op_params == 16_809_984  # docs/c2fnas.md#counts: 16.810M for the all-3D OPs
    widths = C2FNAS.slots(width=TINY)
    assert [widths[n] for n in ("c0.op0", "c2.op0", "c4.op0", "c5.op0", "c11.op1")] == [8, 16, 32, 64, 8]
    net = C2FNAS(operator=Homogeneous("vol2d"), width=TINY)
    modules = dict(net.named_modules())
    for name, width in widths.items():
        conv = modules[name].conv[0]
        assert tuple(conv.weight.shape) == (width, width, 3, 3, 1)  # 2D = 3x3x1: the slice axis is the last
        assert isinstance(modules[name].norm, nn.InstanceNorm3d) and modules[name].norm.affine
    # the stem and head stay 3x3x3 and are never slots
    assert net.stem[0].conv.kernel_size == net.head.conv_b.conv.kernel_size == (3, 3, 3)


@pytest.mark.parametrize(
    "operator",
    [
        Homogeneous("c3d"),
        Homogeneous("vol2d"),
        Homogeneous("volp3d"),
        Uniform("v123d"),
        Uniform("v1d"),
        PerLayer({"c0": "vol2d", "c1.op1": "volp3d"}, default="c3d"),
    ],
    ids=repr,
)
def test_forward_shapes_fixed_operators(operator):
    net = C2FNAS(operator=operator, width=TINY, num_classes=3)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 16, 32, 48)).shape == (1, 3, 16, 32, 48)


def test_concat_head_forward_and_bad_inputs():
    net = C2FNAS(operator=Homogeneous("c3d"), width=TINY, num_classes=2, head="concat", in_channels=2)
    with torch.no_grad():
        assert net(torch.randn(2, 2, 32, 16, 16)).shape == (2, 2, 32, 16, 16)
        with pytest.raises(ValueError, match=r"divisible by 16.*\(1, 2, 32, 16, 24\)"):
            net(torch.randn(1, 2, 32, 16, 24))
    with pytest.raises(ValueError, match="head must be one of"):
        C2FNAS(operator=Homogeneous("c3d"), head="heavy")


@pytest.mark.parametrize("op_set", ["v1d", "v2d", "v123d"])
def test_cost_priority_slots_widen_what_follows(op_set):
    net = C2FNAS(operator=CostPriority(op_set), width=TINY)
    n = {"v1d": 3, "v2d": 3, "v123d": 7}[op_set]
    slots = [m for m in net.modules() if isinstance(m, CostPrioritySlot)]
    assert [s.layer for s in slots] == SLOT_NAMES
    for cell in (net.c0, net.c2, net.c6, net.c11):  # plain, down, merge-up, merge
        width = cell.op0.width
        assert cell.op0.out_channels == n * width
        assert cell.post.conv.in_channels == n * width and cell.post.conv.out_channels == width
    assert net.c2.op0.in_channels == 16 and net.c2.pre.conv.in_channels == 8  # down: C -> 2C before the slot
    shares = sorted(set(net.c0.op0.cost_weights.tolist()), reverse=True)
    assert shares[0] / shares[-1] == pytest.approx({"v1d": 1, "v2d": 1, "v123d": 9}[op_set])
    out = net(torch.randn(1, 1, 32, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 3, 32, 32, 32) and net.c9.op1.norm.weight.grad is not None


def test_performance_priority_slots_train_and_eval():
    net = C2FNAS(operator=PerformancePriority("v123d"), width=TINY)
    assert net.c6.post.conv.in_channels == net.c6.op0.width  # emits C, not n·C
    x = torch.randn(1, 1, 32, 32, 32)
    net(x).sum().backward()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # eval runs the (deterministic) selection


def test_derived_arch_validation_and_counts():
    slots = C2FNAS.slots(width=TINY)
    layers = {name: {"3x3x3": w // 2, "3x3x1": w - w // 2} for name, w in slots.items()}
    arch = {"backbone": "c2fnas", "op_set": "v123d", "layers": layers}
    net = C2FNAS(operator=Derived(arch), width=TINY)
    assert dict(net.named_modules())["c9.op1"].conv.counts == layers["c9.op1"]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    bad = {**arch, "layers": {**layers, "c5.op0": {"3x3x3": 1, "3x3x1": 1}}}
    with pytest.raises(ArchError, match=r"'c5.op0'.*sum to 2.*64 output channels"):
        C2FNAS(operator=Derived(bad), width=TINY)
    missing = {**arch, "layers": {k: v for k, v in layers.items() if k != "c11.op1"}}
    with pytest.raises(ArchError, match=r"missing: \['c11.op1'\]"):
        C2FNAS(operator=Derived(missing), width=TINY)
    with pytest.raises(ArchError, match="written for backbone 'resnet3d'"):
        C2FNAS(operator=Derived({**arch, "backbone": "resnet3d"}), width=TINY)
    with pytest.raises(ArchError, match=r"'c0.op0'.*sum to 8, but the layer has 4 output"):
        C2FNAS(operator=Derived(arch), width=TINY / 2)  # an arch found at another width


def test_per_layer_factory_errors_name_the_key():
    with pytest.raises(ValueError, match=r"unknown operator kinds \{'c3': 'c4d'\}"):
        PerLayer({"c3": "c4d"})
    with pytest.raises(ValueError, match=r"keys \['c12'\] match no slot of c2fnas"):
        C2FNAS(operator=PerLayer({"c12": "c3d"}, default="c3d"), width=TINY)
    with pytest.raises(ValueError, match=r"no operator for slot 'c0.op0'"):
        C2FNAS(operator=PerLayer({"c1": "c3d"}), width=TINY)
    factory = PerLayer({"c1": "vol2d", "c1.op1": "volp3d"}, default="c3d")
    assert [factory.kind(n) for n in ("c1.op0", "c1.op1", "c10.op0")] == ["vol2d", "volp3d", "c3d"]
