"""``python -m cakes.convert``: the authors' checkpoints (github.com/yucornetto/CAKES) to ours and
back. Their state dicts are built here from their model code's layout; a small re-implementation
of their network's forward (separate sub-kernel convs concatenated in their order) checks that
their network and ours give the same logits on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from cakes.ops.arch import load_arch
from cakes.backbones import ResNet3d
from cakes.config import compose_config
from cakes.convert import (
    AUTHORS_GROUP_ORDER,
    authors_to_ours,
    convert_authors,
    convert_to_authors,
    main,
    ours_to_authors,
)
from cakes.modules import VideoClassificationModule
from cakes.ops import Derived

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = (3, 4, 6, 3)
WIDTH = 0.125  # planes 8, 16, 32, 64
CLASSES = 4
TINY = [f"backbone.width={WIDTH}", f"data.num_classes={CLASSES}", "data.num_frames=4", "data.crop_size=32"]


def tiny_arch(path: Path) -> Path:
    """A c123d arch for the width-1/8 ResNet-50 with uneven splits and empty groups (which shift
    the authors' conv indices)."""
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for s, n in enumerate(BLOCKS):
        planes = 8 * 2**s
        for b in range(n):
            cut = sorted(torch.randint(0, planes + 1, (2,), generator=gen).tolist())
            layers[f"layer{s + 1}.{b}"] = {"3x3x3": cut[0], "1x3x3": cut[1] - cut[0], "3x1x1": planes - cut[1]}
    layers["layer1.1"] = {"3x3x3": 0, "1x3x3": 5, "3x1x1": 3}
    layers["layer1.2"] = {"3x3x3": 8, "1x3x3": 0, "3x1x1": 0}
    path.write_text(yaml.safe_dump({"backbone": "resnet3d", "op_set": "c123d", "layers": layers}, sort_keys=False))
    return path


def authors_state(arch_path: Path, seed: int = 0, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Random weights under the authors' keys and shapes (``TemporalModel`` with ``new_fc``,
    ``I3D.ResNet`` with ``conv1_2_3d`` ops: ``convT.convs.<i>.0`` per non-empty group, ``convT.out.0``)."""
    gen = torch.Generator().manual_seed(seed)
    arch = load_arch(arch_path)
    state: dict[str, torch.Tensor] = {}

    def conv(name, o, i, k):
        fan_in = i * k[0] * k[1] * k[2]
        state[f"{prefix}base_model.{name}.weight"] = torch.randn(o, i, *k, generator=gen) / fan_in**0.5

    def bn(name, c):
        p = f"{prefix}base_model.{name}"
        state[f"{p}.weight"] = torch.rand(c, generator=gen) + 0.5
        state[f"{p}.bias"] = torch.randn(c, generator=gen) * 0.1
        state[f"{p}.running_mean"] = torch.randn(c, generator=gen) * 0.1
        state[f"{p}.running_var"] = torch.rand(c, generator=gen) + 0.5
        state[f"{p}.num_batches_tracked"] = torch.tensor(1000 + c)

    conv("conv1", 8, 3, (1, 7, 7)), bn("bn1", 8)
    inp = 8
    for s, n in enumerate(BLOCKS):
        planes = 8 * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            conv(f"{p}.conv1", planes, inp, (1, 1, 1)), bn(f"{p}.bn1", planes)
            groups = [(sub, c) for sub, c in arch.layers[p].items() if c]
            for i, (sub, c) in enumerate(groups):
                conv(f"{p}.convT.convs.{i}.0", c, planes, tuple(int(x) for x in sub.split("x")))
            bn(f"{p}.convT.out.0", planes)
            conv(f"{p}.conv3", planes * 4, planes, (1, 1, 1)), bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inp, (1, 1, 1)), bn(f"{p}.downsample.1", planes * 4)
            inp = planes * 4
    state[f"{prefix}new_fc.weight"] = torch.randn(CLASSES, inp, generator=gen) * 0.1
    state[f"{prefix}new_fc.bias"] = torch.randn(CLASSES, generator=gen)
    return state


def authors_forward(state: dict[str, torch.Tensor], clip: torch.Tensor) -> torch.Tensor:
    """The authors' network in eval mode on ``state``: ``(N, 3, T, H, W) -> (N, classes)``.

    Each bottleneck's ``convT`` runs its sub-kernel convs separately (stride (1, s, s), padding k//2
    per axis), concatenates them in ``convs.<i>`` order, then ``out.0`` BN and ReLU. The head averages
    each frame's 7x7 map (their ``AvgPool2d(7)`` at 224², a spatial mean here), applies ``new_fc``
    per frame and averages over the segments."""
    sd = {k.removeprefix("module."): v for k, v in state.items()}

    def bn(x, p):
        return F.batch_norm(
            x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5
        )

    x = F.relu(bn(F.conv3d(clip, sd["base_model.conv1.weight"], stride=(1, 2, 2), padding=(0, 3, 3)), "base_model.bn1"))
    x = F.max_pool3d(x, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    for s, n in enumerate(BLOCKS):
        for b in range(n):
            p = f"base_model.layer{s + 1}.{b}"
            stride = (1, 2, 2) if (s > 0 and b == 0) else (1, 1, 1)
            out = F.relu(bn(F.conv3d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            convs, i = [], 0
            while f"{p}.convT.convs.{i}.0.weight" in sd:
                w = sd[f"{p}.convT.convs.{i}.0.weight"]
                convs.append(F.conv3d(out, w, stride=stride, padding=tuple(k // 2 for k in w.shape[2:])))
                i += 1
            out = F.relu(bn(torch.cat(convs, dim=1), f"{p}.convT.out.0"))
            out = bn(F.conv3d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            residual = x
            if f"{p}.downsample.0.weight" in sd:
                residual = bn(F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + residual)
    frames = x.mean(dim=(3, 4)).transpose(1, 2)  # (N, T, C)
    return F.linear(frames, sd["new_fc.weight"], sd["new_fc.bias"]).mean(dim=1)


@pytest.fixture()
def arch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    return tiny_arch(tmp_path / "tiny_c123d.yaml")


def convert(
    tmp_path: Path,
    arch_path: Path,
    state: dict,
    name: str = "theirs.pth.tar",
    wrap: bool = True,
    extra: tuple[str, ...] = (),
) -> Path:
    src = tmp_path / name
    torch.save({"epoch": 70, "arch": "resnet50", "state_dict": state, "best_prec1": 47.2} if wrap else state, src)
    return convert_authors(src, tmp_path / "ours.ckpt", [f"arch={arch_path}", *TINY, *extra])


def test_every_tensor_lands_in_its_group_and_converting_back_reproduces_the_source(tmp_path, arch_path):
    state = authors_state(arch_path)
    ckpt = torch.load(convert(tmp_path, arch_path, state), weights_only=True)
    ours = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    theirs = {k.removeprefix("module.base_model."): v for k, v in state.items()}
    arch = load_arch(arch_path)
    # layer1.1 has no 3x3x3 group: its 1x3x3 conv is convs.0, its 3x1x1 conv convs.1
    torch.testing.assert_close(
        ours["layer1.1.conv2.conv.weights.1x3x3"], theirs["layer1.1.convT.convs.0.0.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        ours["layer1.1.conv2.conv.weights.3x1x1"], theirs["layer1.1.convT.convs.1.0.weight"], rtol=0, atol=0
    )
    for layer, counts in arch.layers.items():
        present = [s for s in AUTHORS_GROUP_ORDER if counts[s]]
        for i, sub in enumerate(present):
            assert torch.equal(ours[f"{layer}.conv2.conv.weights.{sub}"], theirs[f"{layer}.convT.convs.{i}.0.weight"])
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(ours[f"{layer}.conv2.norm.{n}"], theirs[f"{layer}.convT.out.0.{n}"])
        assert torch.equal(ours[f"{layer}.conv3.weight"], theirs[f"{layer}.conv3.weight"])
    assert torch.equal(ours["layer3.0.downsample.1.running_var"], theirs["layer3.0.downsample.1.running_var"])
    assert torch.equal(ours["fc.weight"], state["module.new_fc.weight"])
    assert ckpt["cakes"]["converted_from"]["entries"] == {"epoch": 70, "arch": "resnet50", "best_prec1": 47.2}

    back = convert_to_authors(tmp_path / "ours.ckpt", tmp_path / "back.pth.tar")
    restored = torch.load(back, weights_only=True)
    assert {k: v for k, v in restored.items() if k != "state_dict"} == {
        "epoch": 70,
        "arch": "resnet50",
        "best_prec1": 47.2,
    }
    assert restored["state_dict"].keys() == state.keys()
    assert all(
        torch.equal(restored["state_dict"][k], v) and restored["state_dict"][k].dtype == v.dtype
        for k, v in state.items()
    )


def test_bare_state_dict_without_module_prefix_round_trips(tmp_path, arch_path):
    state = authors_state(arch_path, seed=1, prefix="")
    convert(tmp_path, arch_path, state, name="bare.pth", wrap=False)
    restored = torch.load(convert_to_authors(tmp_path / "ours.ckpt", tmp_path / "back.pth"), weights_only=True)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], v) for k, v in state.items())


def test_authors_network_and_ours_give_the_same_logits(tmp_path, arch_path):
    state = authors_state(arch_path, seed=2)
    model = VideoClassificationModule.load_from_checkpoint(convert(tmp_path, arch_path, state), weights_only=True)
    model.eval()
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(clip), authors_forward(state, clip)
    assert ours.shape == (2, CLASSES)
    assert theirs.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("module.base_model.layer2.1.bn1.running_var"),
            r"missing keys: \['base_model.layer2.1.bn1.running_var'\]",
        ),
        (
            lambda s: s.__setitem__("module.base_model.layer4.2.convT.extra.weight", torch.zeros(1)),
            r"unexpected keys: \['base_model.layer4.2.convT.extra.weight'\]",
        ),
        (
            lambda s: s.__setitem__("module.new_fc.weight", torch.zeros(7, 256)),
            r"new_fc.weight: checkpoint \(7, 256\) vs network \(4, 256\)",
        ),
    ],
)
def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, arch_path, change, message):
    state = authors_state(arch_path)
    change(state)
    with pytest.raises(ValueError, match=message):
        convert(tmp_path, arch_path, state)
    assert not (tmp_path / "ours.ckpt").exists()


def test_a_group_width_that_differs_from_the_arch_names_the_layer(tmp_path, arch_path):
    state = authors_state(arch_path)
    counts = load_arch(arch_path).layers["layer3.2"]
    groups = [s for s in AUTHORS_GROUP_ORDER if counts[s]]
    assert len(groups) >= 2
    first, second = (f"module.base_model.layer3.2.convT.convs.{i}.0.weight" for i in (0, 1))
    state[first] = torch.cat([state[first], torch.zeros_like(state[first][:1])])
    state[second] = state[second][1:]  # one channel moved between groups: same total width
    with pytest.raises(ValueError, match=r"layer layer3.2: checkpoint has convs.0 .*; the arch gives convs.0") as err:
        convert(tmp_path, arch_path, state)
    assert "layer3.1" not in str(err.value)


def test_published_archs_map_completely_at_full_size():
    for path in sorted((ROOT / "archs").glob("*.yaml")):
        arch = load_arch(path)
        with torch.device("meta"):
            net = ResNet3d(operator=Derived(arch), num_classes=174)
        ours = net.state_dict()
        theirs = ours_to_authors(ours, arch)
        assert len(theirs) == len(ours)
        assert authors_to_ours(theirs, net, arch, str(path)).keys() == ours.keys()
        if path.stem == "ssv1_cakes123d_p":  # layer1.1 has no 3x1x1 channels: two convs, no convs.2
            assert "base_model.layer1.1.convT.convs.1.0.weight" in theirs
            assert "base_model.layer1.1.convT.convs.2.0.weight" not in theirs


def test_command_line_and_a_test_only_train_run(tmp_path, arch_path, capsys):
    from conftest import TINY_VIDEO

    from cakes.run import run

    src = tmp_path / "theirs.pth"
    torch.save(authors_state(arch_path), src)
    assert main(["authors", str(src), str(tmp_path / "ours.ckpt"), f"arch={arch_path}", *TINY]) == 0
    assert main(["authors", str(src), str(tmp_path / "x.ckpt")]) == 1
    assert "arch=ssv1_cakes123d_p" in capsys.readouterr().err
    video = [o for o in TINY_VIDEO if not o.startswith("data.num_classes=")]
    cfg = compose_config(
        "train",
        [
            "experiment=demo_cakes",
            f"arch={arch_path}",
            *video,
            f"data.num_classes={CLASSES}",
            f"init={tmp_path / 'ours.ckpt'}",
            "train=false",
        ],
    )
    cfg.paths.output_dir = str(tmp_path / "run")
    metrics = run(cfg)
    assert metrics["test/videos"] == 8 and 0.0 <= metrics["test/top1"] <= 1.0
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was fitted
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["initial_weights"]["init"] == str(tmp_path / "ours.ckpt")
