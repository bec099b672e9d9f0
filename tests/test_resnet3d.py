"""ResNet I3D backbone: exact counts, presets, ImageNet inflation from torchvision-format weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cakes.ops.arch import ArchError, load_arch
from cakes.backbones import ResNet3d
from cakes.backbones.resnet3d import RESNET_DEPTHS
from cakes.ops import CostPriority, Derived, Homogeneous, inflate_2d
from cakes.profile import profile

ARCHS = Path(__file__).resolve().parents[1] / "archs"
PRESETS = {  # params, GMACs at 8x224², from docs/method.md#counting
    "ssv1_cakes12d_c": (20_498_030, 29.10),
    "ssv1_cakes12d_p": (20_884_718, 28.83),
    "ssv1_cakes23d_c": (35_695_598, 41.19),
    "ssv1_cakes23d_p": (37_477_742, 50.45),
    "ssv1_cakes123d_c": (35_029_358, 38.50),
    "ssv1_cakes123d_p": (33_508_334, 43.62),
}


def meta_net(operator, frames=8, **kw):
    with torch.device("meta"):
        net = ResNet3d(operator=operator, num_classes=174, **kw)
    return net, profile(net, (1, 3, frames, 224, 224))


@pytest.mark.parametrize(
    "kind, params, gmacs", [("c2d", 23_864_558, 32.70), ("p3d", 27_636_974, 37.63), ("c3d", 46_499_054, 62.29)]
)
def test_baseline_counts_are_exact(kind, params, gmacs):
    _, prof = meta_net(Homogeneous(kind))
    assert prof.params == params
    assert prof.macs / 1e9 == pytest.approx(gmacs, rel=1e-3)
    _, prof16 = meta_net(Homogeneous(kind), frames=16)
    assert prof16.macs == 2 * prof.macs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_published_presets(preset):
    _, prof = meta_net(Derived(ARCHS / f"{preset}.yaml"))
    params, gmacs = PRESETS[preset]
    assert prof.params == params
    assert prof.macs / 1e9 == pytest.approx(gmacs, abs=0.006)


def test_closed_form_params_for_any_config():
    arch = load_arch(ARCHS / "ssv1_cakes123d_p.yaml")
    planes = ResNet3d.slots(depth=50, width=1.0)
    vol = {"3x3x3": 27, "1x3x3": 9, "3x1x1": 3}
    closed = (
        23_864_558
        - 11_317_248
        + sum(planes[name] * sum(vol[k] * n for k, n in counts.items()) for name, counts in arch.layers.items())
    )
    _, prof = meta_net(Derived(arch))
    assert prof.params == closed


def test_forward_shapes_tiny_variants():
    for depth in RESNET_DEPTHS:
        net = ResNet3d(operator=Homogeneous("c3d"), depth=depth, width=0.125, num_classes=7)
        out = net(torch.randn(2, 3, 4, 32, 32))
        assert out.shape == (2, 7)


def test_arch_validation_names_layer_and_numbers():
    arch = load_arch(ARCHS / "ssv1_cakes12d_c.yaml").to_dict()
    arch["layers"]["layer2.1"] = {"1x3x3": 100, "3x1x1": 20}
    with pytest.raises(ArchError, match=r"'layer2.1'.*sum to 120.*128 output channels"):
        ResNet3d(operator=Derived(arch))
    del arch["layers"]["layer2.1"]
    with pytest.raises(ArchError, match=r"missing: \['layer2.1'\]"):
        ResNet3d(operator=Derived(arch))


# --- ImageNet initialisation from a torchvision-format state dict ------------------------------
def torchvision_state(depth: int = 50, width: float = 1.0, classes: int = 1000, seed: int = 0) -> dict:
    """Random weights under torchvision's ResNet key names and 2D shapes."""
    gen = torch.Generator().manual_seed(seed)
    kind, blocks = RESNET_DEPTHS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    state: dict[str, torch.Tensor] = {}

    def conv(name, o, i, k):
        state[f"{name}.weight"] = torch.randn(o, i, k, k, generator=gen)

    def bn(name, c):
        state[f"{name}.weight"] = torch.rand(c, generator=gen) + 0.5
        state[f"{name}.bias"] = torch.randn(c, generator=gen)
        state[f"{name}.running_mean"] = torch.randn(c, generator=gen)
        state[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(100)

    def w(c):
        return max(1, int(round(c * width)))

    conv("conv1", w(64), 3, 7)
    bn("bn1", w(64))
    inp = w(64)
    for s, n in enumerate(blocks):
        planes = w(64 * 2**s)
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            if kind == "bottleneck":
                conv(f"{p}.conv1", planes, inp, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inp, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            if b == 0 and (s > 0 or inp != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inp, 1), bn(f"{p}.downsample.1", planes * expansion)
            inp = planes * expansion
    state["fc.weight"] = torch.randn(classes, inp, generator=gen)
    state["fc.bias"] = torch.randn(classes, generator=gen)
    return state


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision_state(50, 0.25), path)
    return path


def test_c2d_init_consumes_every_key(imagenet_file):
    state = torch.load(imagenet_file, weights_only=True)
    net = ResNet3d(operator=Homogeneous("c2d"), width=0.25, num_classes=10, pretrained=imagenet_file)
    report = net.inflation
    assert report.dropped == ["fc.weight", "fc.bias"]
    assert report.random_init == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(net.conv1.weight[:, :, 0], state["conv1.weight"])
    torch.testing.assert_close(net.layer3[2].conv2.conv[0].weight[:, :, 0], state["layer3.2.conv2.weight"])
    torch.testing.assert_close(net.layer3[2].conv2.norm.running_var, state["layer3.2.bn2.running_var"])
    torch.testing.assert_close(
        net.layer2[0].downsample[0].weight[:, :, 0, 0, 0], state["layer2.0.downsample.0.weight"][:, :, 0, 0]
    )


def test_cakes_groups_follow_inflation_rules(imagenet_file):
    state = torch.load(imagenet_file, weights_only=True)
    slots = ResNet3d.slots(depth=50, width=0.25)
    layers = {}
    for name, width in slots.items():
        a = width // 3
        layers[name] = {"3x3x3": a, "1x3x3": width - 2 * a, "3x1x1": a}
    arch = {"backbone": "resnet3d", "op_set": "c123d", "layers": layers}
    net = ResNet3d(operator=Derived(arch), width=0.25, num_classes=10, pretrained=imagenet_file)
    w2d = state["layer2.1.conv2.weight"]
    counts = layers["layer2.1"]
    op = net.layer2[1].conv2.conv
    n3, n2 = counts["3x3x3"], counts["1x3x3"]
    torch.testing.assert_close(op.weights["3x3x3"], inflate_2d(w2d[:n3], "3x3x3"))
    torch.testing.assert_close(op.weights["1x3x3"][:, :, 0], w2d[n3 : n3 + n2])  # 2D groups = source rows
    torch.testing.assert_close(op.weights["3x1x1"][:, :, 1, 0, 0], w2d[n3 + n2 :].sum(dim=(2, 3)) / 3)
    assert net.inflation.random_init == ["fc.weight", "fc.bias"]


def test_p3d_temporal_conv_keeps_random_init(imagenet_file):
    net = ResNet3d(operator=Homogeneous("p3d"), width=0.25, num_classes=10, pretrained=imagenet_file)
    temporal = [k for k in net.inflation.random_init if k.endswith("conv.1.weight")]
    assert len(temporal) == 16 and "layer1.0.conv2.conv.1.weight" in temporal


def test_cost_supernet_init_tiles_the_aggregating_conv(imagenet_file):
    state = torch.load(imagenet_file, weights_only=True)
    net = ResNet3d(operator=CostPriority("c12d"), width=0.25, num_classes=10, pretrained=imagenet_file)
    conv3 = net.layer1[0].conv3.weight[:, :, 0, 0, 0]
    src = state["layer1.0.conv3.weight"][:, :, 0, 0]
    torch.testing.assert_close(conv3, torch.cat([src, src], dim=1))
    torch.testing.assert_close(net.layer1[0].conv2.norm.bias, state["layer1.0.bn2.bias"].repeat(2))


def test_bad_state_dicts_are_reported_by_name(tmp_path):
    state = torchvision_state(50, 0.25)
    state["layer9.weight"] = torch.zeros(1)
    del state["layer1.0.bn3.bias"]
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        ResNet3d(operator=Homogeneous("c2d"), width=0.25, num_classes=10, pretrained=path)
    message = str(err.value)
    assert "layer9.weight" in message and "layer1.0.bn3.bias" in message
    assert "layer1.0.conv1.weight: model (16, 16, 1, 1, 1) vs source" in message
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNet3d(operator=Homogeneous("c2d"), width=0.25, num_classes=10, pretrained=tmp_path / "nope.pth")
