"""ONNX export (``python -m cakes.export``): onnxruntime runs the exported C3D, a published CAKES
architecture and a found one with the PyTorch outputs (max |difference| ≤ 1e-4 on random clips),
from config overrides and from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cakes import export
from cakes.ops.arch import load_arch
from cakes.backbones import ResNet3d
from cakes.config import compose_train_config
from cakes.builders import build_network
from test_benchmarks import load

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.num_frames=4", "data.crop_size=32"]


def published_tiny(tmp_path: Path) -> Path:
    """``ssv1_cakes23d_c`` with its per-layer mix fitted to the tiny ResNet-50 (width 1/8)."""
    network = load("network")
    arch = network.fit_arch(load_arch(ROOT / "archs" / "ssv1_cakes23d_c.yaml"), ResNet3d.slots(depth=50, width=0.125))
    path = tmp_path / "ssv1_cakes23d_c_tiny.yaml"
    path.write_text(yaml.safe_dump(arch.to_dict()))
    return path


def check_parity(net: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        x = torch.randn(*shape, generator=gen)
        assert export.onnx_max_abs_diff(net, path, x) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", ["c3d", "published", "found"])
def test_onnx_export_matches_pytorch(tmp_path, case, capsys):
    overrides = {
        "c3d": ["experiment=demo_c3d", *TINY],
        "published": ["experiment=demo_cakes", f"arch={published_tiny(tmp_path)}", *TINY],
        "found": [
            "experiment=demo_cakes",
            f"arch={ROOT / 'benchmarks' / 'archs' / 'demo_search_found_c123d.yaml'}",
            *TINY,
        ],
    }[case]
    out = tmp_path / "model.onnx"
    torch.manual_seed(0)
    assert export.main([*overrides, "format=onnx", f"out={out}"]) == out
    assert "max |difference|" in capsys.readouterr().out
    cfg = compose_train_config(overrides)
    torch.manual_seed(0)  # the network export.main built: same config, same seed, same weights
    net = build_network(cfg.model.net, pretrained=False)
    import onnx

    nodes = onnx.load(str(out)).graph.node
    if case != "c3d":  # a CakesConv3d exports as one Conv per sub-kernel group, concatenated
        assert any(n.op_type == "Concat" for n in nodes)
    check_parity(net, out, (1, *(int(s) for s in cfg.model.input_shape)))


@pytest.mark.slow
def test_onnx_export_from_a_checkpoint(tmp_path):
    overrides = ["experiment=demo_cakes", f"arch={published_tiny(tmp_path)}", *TINY]
    cfg = compose_train_config(overrides)
    net = build_network(cfg.model.net, pretrained=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights that only the checkpoint has
    ckpt = tmp_path / "last.ckpt"
    from cakes.utils import plain

    torch.save(
        {
            "hyper_parameters": {"net": plain(cfg.model.net), "input_shape": plain(cfg.model.input_shape)},
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        },
        ckpt,
    )
    out = export.main([f"ckpt={ckpt}", "format=onnx", f"out={tmp_path / 'ckpt.onnx'}", "batch=2"])
    check_parity(net, out, (2, 3, 4, 32, 32))


def test_export_arguments_and_checkpoints_are_checked(tmp_path):
    with pytest.raises(SystemExit, match=r"format='tflite' is not supported; expected one of \['onnx'\]"):
        export.main(["format=tflite", "out=x.onnx"])
    with pytest.raises(SystemExit, match=r"give the output file"):
        export.main(["experiment=demo_c3d"])
    with pytest.raises(SystemExit, match=r"batch must be a positive integer, got 'two'"):
        export.main(["out=x.onnx", "batch=two"])
    with pytest.raises(SystemExit, match=r"drop \['experiment=demo_c3d'\]"):
        export.main(["ckpt=x.ckpt", "experiment=demo_c3d", "out=x.onnx"])
    assert export.split_arguments(["out=a.onnx", "arch=b", "batch=2"]) == ({"out": "a.onnx", "batch": "2"}, ["arch=b"])
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing.ckpt"):
        export.network_from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain.ckpt: not a cakes checkpoint"):
        export.network_from_checkpoint(tmp_path / "plain.ckpt")
    cfg = compose_train_config(["experiment=demo_c3d"])
    from cakes.utils import plain

    torch.save(
        {
            "hyper_parameters": {"net": plain(cfg.model.net), "input_shape": [3, 4, 32, 32]},
            "state_dict": {"net.fc.weight": torch.zeros(1)},
        },
        tmp_path / "bad.ckpt",
    )
    with pytest.raises(
        ValueError,
        match=r"(?s)bad.ckpt does not fit the network:.*missing keys: \[.*'conv1.weight'.*"
        r"fc.weight: checkpoint \(1,\) vs network \(4, 256\)",
    ):
        export.network_from_checkpoint(tmp_path / "bad.ckpt")
