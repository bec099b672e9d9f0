"""Arch yaml: the search → retrain handoff (schema, validation, atomic export, plot)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from cakes.ops.arch import Arch, ArchError, load_arch, save_arch
from cakes.backbones import ResNet3d
from cakes.callbacks.prune import found_arch, plot_arch
from cakes.ops import CostPriority, Derived

ARCHS = Path(__file__).resolve().parents[1] / "archs"


def tiny_arch() -> Arch:
    slots = ResNet3d.slots(depth=18, width=0.25)
    layers = {name: {"3x3x3": w // 4, "1x3x3": w // 2, "3x1x1": w - w // 4 - w // 2} for name, w in slots.items()}
    return Arch(backbone="resnet3d", op_set="c123d", layers=layers, meta={"note": "test", "lasso": 1e-4})


def test_yaml_round_trip_is_exact(tmp_path):
    arch = tiny_arch()
    path = save_arch(arch, tmp_path / "a.yaml", header="hello\nworld")
    assert path.read_text().startswith("# hello\n# world\n")
    again = load_arch(path)
    assert again == arch
    assert list(again.layers["layer1.0.conv1"]) == ["3x3x3", "1x3x3", "3x1x1"]  # order kept
    save_arch(again, tmp_path / "b.yaml")
    assert load_arch(tmp_path / "b.yaml") == arch


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["layers"].__setitem__("layer9.0", {"1x3x3": 4}), r"unexpected: \['layer9.0'\]"),
        (lambda d: d["layers"]["layer1.0"].__setitem__("1x3x3", 99), r"'layer1.0'.*sum to .* 64 output channels"),
        (lambda d: d["layers"]["layer1.0"].__setitem__("3x3x1", 1), r"'3x3x1' is not in op set c123d"),
        (lambda d: d["layers"]["layer1.0"].__setitem__("3x7x3", 1), r"bad sub-kernel '3x7x3'"),
        (lambda d: d.__setitem__("_target_", "os.system"), r"key '_target_' is not allowed"),
        (lambda d: d["layers"]["layer1.0"].__setitem__("_target_", "os.system"), r"'_target_' is not allowed"),
        (lambda d: d.__setitem__("extra", 1), r"unknown keys \['extra'\]"),
        (lambda d: d.__setitem__("backbone", "c2fnas"), r"written for backbone 'c2fnas'"),
        (lambda d: d.pop("op_set"), r"missing key 'op_set'"),
    ],
)
def test_invalid_arch_files_fail_clearly(tmp_path, mutate, message):
    data = yaml.safe_load((ARCHS / "ssv1_cakes123d_c.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ArchError, match=message), torch.device("meta"):
        ResNet3d(operator=Derived(path))


def test_arch_by_name_is_read_as_data_never_instantiated(tmp_path, monkeypatch):
    """``arch=<name>`` resolves through cakes.arch (not Hydra): a _target_ inside is rejected."""
    from cakes.config import compose_config
    from cakes.builders import build_network

    (tmp_path / "found" / "arch").mkdir(parents=True)
    data = tiny_arch().to_dict()
    data["layers"]["layer1.0.conv1"] = {"_target_": "builtins.print", "1x3x3": 16}
    (tmp_path / "found" / "arch" / "evil.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", ["experiment=demo_cakes", "arch=evil"])
    with pytest.raises(Exception, match="'_target_' is not allowed"):
        build_network(cfg.model.net, pretrained=False)


def test_arch_names_resolve_to_exports_then_presets(tmp_path):
    from cakes.arch import find_arch

    assert find_arch("ssv1_cakes12d_c", tmp_path) == ARCHS / "ssv1_cakes12d_c.yaml"
    save_arch(tiny_arch(), tmp_path / "arch" / "ssv1_cakes12d_c.yaml")  # an export shadows a preset
    assert find_arch("ssv1_cakes12d_c", tmp_path) == tmp_path / "arch" / "ssv1_cakes12d_c.yaml"
    with pytest.raises(FileNotFoundError, match="arch 'nope' not found.*known: .*ssv1_cakes123d_c"):
        find_arch("nope", tmp_path)


def _slow_writer(path: str) -> None:
    """Writes a large arch slowly enough to be killed mid-export."""
    import cakes.files as files_mod

    real_fdopen = os.fdopen

    class Slow:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            for i in range(0, len(text), 64):
                self.handle.write(text[i : i + 64])
                self.handle.flush()
                time.sleep(0.01)

        def flush(self):
            self.handle.flush()

        def fileno(self):
            return self.handle.fileno()

    files_mod.os.fdopen = lambda fd, mode: Slow(real_fdopen(fd, mode))
    layers = {f"layer{i}": {"1x3x3": i + 1, "3x1x1": 1} for i in range(400)}
    save_arch(Arch("resnet3d", "c12d", layers, {}), path)


def test_kill_during_export_leaves_no_partial_file(tmp_path):
    target = tmp_path / "arch" / "found.yaml"
    save_arch(tiny_arch(), target)  # an earlier, complete export
    before = target.read_text()
    proc = mp.get_context("fork").Process(target=_slow_writer, args=(str(target),))
    proc.start()
    deadline = time.time() + 10
    while not list(target.parent.glob(".found.yaml.*.tmp")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(target.parent.glob(".found.yaml.*.tmp")), "the writer never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert target.read_text() == before  # the previous export is intact, never half-written
    assert load_arch(target) == tiny_arch()


def test_basic_blocks_refuse_widened_slots():
    with pytest.raises(ValueError, match="layer1.0.conv2 emits 32 channels for 16.*bottleneck"):
        ResNet3d(operator=CostPriority("c12d"), depth=18, width=0.25)


def test_found_arch_from_a_supernet_and_plot(tmp_path):
    net = ResNet3d(operator=CostPriority("c12d"), depth=50, width=0.125, num_classes=5)
    arch = found_arch(net, "layer_topk", {"k": 1})
    assert arch.backbone == "resnet3d" and arch.op_set == "c12d"
    assert list(arch.layers) == list(ResNet3d.slots(depth=50, width=0.125))
    derived = ResNet3d(operator=Derived(arch), depth=50, width=0.125, num_classes=5)  # validates
    assert derived(torch.randn(1, 3, 2, 32, 32)).shape == (1, 5)
    png = plot_arch(arch, tmp_path / "arch.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_provenance_from_hydra_is_exported_as_plain_yaml(tmp_path):
    """Hydra hands the callback DictConfig/ListConfig values (e.g. ``search.op_set=[3x3x3,1x3x3]``);
    they must reach the arch yaml as plain lists, not fail the export at the end of a search."""
    from omegaconf import OmegaConf

    from cakes.callbacks.prune import CakesPruneCallback

    provenance = OmegaConf.create({"op_set": ["3x3x3", "1x3x3"], "lasso": 0.0})
    callback = CakesPruneCallback(name="listed", arch_dir=str(tmp_path), provenance=provenance)
    net = ResNet3d(operator=CostPriority(["3x3x3", "1x3x3"]), depth=50, width=0.125, num_classes=3)
    path = save_arch(found_arch(net, "layer_topk", callback.provenance), tmp_path / "listed.yaml")
    assert load_arch(path).meta["op_set"] == ["3x3x3", "1x3x3"]
