"""``init=supernet:<checkpoint>``: the derived network inherits each kept (op, channel)'s weights and
BN entries, and conv3's matching input columns; its first eval forward equals the supernet's
(cost-priority: with the dropped paths masked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cakes.ops.arch import Arch
from cakes.backbones import ResNet3d
from cakes.callbacks.prune import found_arch
from cakes.inherit import inherit
from cakes.ops import CostPriority, Derived, PerformancePriority, search_slots
from cakes.weights import apply_init

WIDTH = 0.125
CLASSES = 4


def randomise(net: torch.nn.Module, seed: int) -> None:
    """Random weights and BN statistics everywhere, so selections and columns matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("norm.weight", "bn1.weight", "bn3.weight", "downsample.1.weight")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen))  # mixed signs and sizes: |γ| ranks
            else:
                fan = tensor[0].numel() if tensor.dim() > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / fan**0.5)


def supernet(mode: str, sampling: str = "per_channel", selection: str = "layer_topk") -> ResNet3d:
    factory = (
        CostPriority("c123d")
        if mode == "cost"
        else PerformancePriority("c123d", sampling=sampling, selection=selection, seed=0)
    )
    net = ResNet3d(operator=factory, width=WIDTH, num_classes=CLASSES)
    randomise(net, seed=1)
    return net.eval()


def derived_arch(net: ResNet3d) -> Arch:
    """What the search exports: layer_topk counts (cost), the slot's own derive() counts (performance)."""
    if any(s.search_mode == "cost" for s in search_slots(net)):
        return found_arch(net, "layer_topk")
    arch = found_arch(net, "layer_topk")
    arch.layers = {s.layer: s.derive()[0].conv.counts for s in search_slots(net)}
    return arch


def mask_dropped_paths(net: ResNet3d) -> None:
    """γ = β = 0 for every (op, channel) outside the layer_topk selection of a cost-priority slot."""
    with torch.no_grad():
        for slot in search_slots(net):
            ops, channels = slot.select("layer_topk")
            keep = torch.zeros(slot.norm.num_features, dtype=torch.bool)
            keep[ops * slot.width + channels] = True
            slot.norm.weight[~keep] = 0
            slot.norm.bias[~keep] = 0


@pytest.mark.parametrize(
    "mode, sampling, selection",
    [
        ("cost", None, None),
        ("performance", "per_channel", "channel_argmax"),
        ("performance", "pair_subset", "layer_topk"),
    ],
)
def test_derived_eval_forward_equals_the_supernets(mode, sampling, selection):
    sup = supernet(mode, sampling, selection)
    derived = ResNet3d(operator=Derived(derived_arch(sup)), width=WIDTH, num_classes=CLASSES).eval()
    before = derived(torch.zeros(1, 3, 4, 32, 32)).detach()
    inherit(derived, sup)
    if mode == "cost":
        mask_dropped_paths(sup)
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = sup(clip), derived(clip)
    assert expected.std() > 1e-3 and not torch.allclose(got[:1], before)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cost_priority_equality_needs_the_mask():
    """The dropped paths carry signal in the unmasked supernet: inheriting is not a no-op copy."""
    sup = supernet("cost")
    derived = ResNet3d(operator=Derived(derived_arch(sup)), width=WIDTH, num_classes=CLASSES).eval()
    inherit(derived, sup)
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(derived(clip), sup(clip), rtol=1e-3, atol=1e-4)


def test_an_arch_from_another_rule_is_refused_naming_the_layer():
    sup = supernet("cost")
    arch = found_arch(sup, "channel_argmax")
    derived = ResNet3d(operator=Derived(arch), width=WIDTH, num_classes=CLASSES)
    other = [s.layer for s in search_slots(sup) if s.counts("channel_argmax") != s.counts("layer_topk")]
    assert other
    with pytest.raises(ValueError, match=rf"layer {other[0]}: the supernet keeps .* the arch gives"):
        inherit(derived, sup)


def test_init_supernet_reads_a_search_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Through the checkpoint a search writes (network rebuilt from its stored config)."""
    from hydra.utils import instantiate

    from cakes.config import compose_config

    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("search", ["experiment=demo_search", "data.num_classes=4"])
    module = instantiate(cfg.model)
    randomise(module.net, seed=2)
    path = tmp_path / "search.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    module.net.eval()
    derived = ResNet3d(operator=Derived(derived_arch(module.net)), width=WIDTH, num_classes=4).eval()
    apply_init(derived, f"supernet:{path}")
    mask_dropped_paths(module.net)
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(derived(clip), module.net(clip), rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="init=supernet:/nope.ckpt"):
        apply_init(derived, "supernet:/nope.ckpt")
