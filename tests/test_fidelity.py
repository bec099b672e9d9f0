"""Fidelity to the authors' code: the un-weighted lasso, Kaiming fan_out init of new convs, and the
SSV1 recipes' ImageNet requirement."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cakes.backbones import ResNet3d
from cakes.callbacks.supernet import apply_lasso
from cakes.config import compose_config
from cakes.ops import CostPriority, Homogeneous, HomogeneousConv3d, SubKernelConv3d
from cakes.ops.search import cost_shares
from cakes.ops.subkernel import OP_SETS
from cakes.run import run


# --- search.cost: uniform ---------------------------------------------------------------------
def test_uniform_cost_gives_every_op_the_same_weight_one():
    for name in ("c12d", "c23d", "c123d", "v123d"):
        assert cost_shares(OP_SETS[name], "uniform") == [1.0] * len(OP_SETS[name])
    with pytest.raises(ValueError, match="'uniform'"):
        cost_shares(OP_SETS["c12d"], "flat")


def test_uniform_lasso_adds_exactly_s_sign_gamma_to_every_path():
    torch.manual_seed(0)
    slot = CostPriority("c123d", cost="uniform")(layer="l", in_channels=3, out_channels=4, norm=nn.BatchNorm3d)
    with torch.no_grad():
        slot.norm.weight.copy_(torch.randn(12))
    slot(torch.randn(2, 3, 3, 5, 5)).square().mean().backward()
    before = slot.norm.weight.grad.clone()
    apply_lasso(slot, 0.25)
    torch.testing.assert_close(
        slot.norm.weight.grad - before, 0.25 * torch.sign(slot.norm.weight.detach()), atol=1e-7, rtol=0
    )


def test_search_cost_uniform_composes_into_the_supernet(tmp_path, monkeypatch):
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("search", ["experiment=demo_search", "search.cost=uniform"])
    assert cfg.operator.cost == "uniform"


# --- new convs: Kaiming normal, fan_out --------------------------------------------------------
def test_p3d_temporal_step_init_is_kaiming_normal_fan_out():
    """The conv ImageNet inflation never covers (P3D's temporal step) gets the authors' init; the
    first step keeps ``nn.Conv3d``'s, as every CAKES op does, so from-scratch demos start alike."""
    torch.manual_seed(0)
    p3d = HomogeneousConv3d(64, 256, "p3d")
    first = p3d[0].weight.detach().flatten()
    assert first.abs().max().item() <= 1 / math.sqrt(64 * 9) + 1e-6  # kaiming_uniform(a=√5): bound 1/√fan_in
    torch.manual_seed(0)
    assert torch.equal(SubKernelConv3d(64, 256, "1x3x3").weight, p3d[0].weight)
    w = p3d[1].weight.detach().flatten()
    std = math.sqrt(2.0 / (256 * 3))  # fan_out = C_out · ∏kernel (the default init would give 0.021)
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert abs(w.mean().item()) < 0.02 * std * 10
    assert w.abs().max().item() > 3.5 * std  # a normal's tail; a uniform init stops at sqrt(3)·std


def test_p3d_temporal_conv_follows_the_authors_init_after_imagenet_loading(tmp_path):
    from test_resnet3d import torchvision_state

    path = tmp_path / "r50.pth"
    torch.save(torchvision_state(width=0.5), path)
    torch.manual_seed(1)
    net = ResNet3d(operator=Homogeneous("p3d"), width=0.5, num_classes=10, pretrained=path)
    temporal = torch.cat([m[1].weight.detach().flatten() for m in net.modules() if isinstance(m, HomogeneousConv3d)])
    # every temporal conv is C→C with C in {32, 64, 128, 256}: pool the standardised weights
    standardised = torch.cat(
        [
            m[1].weight.detach().flatten() / math.sqrt(2.0 / (m.out_channels * 3))
            for m in net.modules()
            if isinstance(m, HomogeneousConv3d)
        ]
    )
    assert temporal.numel() > 100_000
    assert standardised.std().item() == pytest.approx(1.0, rel=0.02)


# --- ImageNet initialisation required by the SSV1 recipes ----------------------------------------
SSV1_CPU = ["trainer=cpu", "logger=csv", "data.root=/nonexistent/ssv1"]


@pytest.mark.parametrize("experiment", ["ssv1_c2d", "ssv1_cakes", "ssv1_search_cost"])
def test_ssv1_recipes_refuse_to_start_without_imagenet_weights(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    config = "search" if "search" in experiment else "train"
    cfg = compose_config(config, [f"experiment={experiment}", *SSV1_CPU])
    cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"backbone.pretrained=/path/resnet50.pth .* backbone.pretrained=none"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_ssv1_from_scratch_on_purpose_warns_and_is_recorded(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", ["experiment=ssv1_c2d", *SSV1_CPU, "backbone.pretrained=none"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="nonexistent"):
        run(cfg)  # gets past the check, records the run, then stops at the (missing) data
    assert any("backbone.pretrained=none" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["initial_weights"]["imagenet"].startswith("none (explicitly disabled")


def test_demo_recipes_do_not_need_imagenet_weights(tmp_path, monkeypatch):
    from cakes.weights import check_initial_weights

    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", ["experiment=demo_c3d"])
    assert check_initial_weights(cfg) == {"init": None, "imagenet": None}


def test_a_given_imagenet_path_is_recorded(tmp_path, monkeypatch):
    from cakes.weights import check_initial_weights

    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", ["experiment=ssv1_c3d", "backbone.pretrained=/w/resnet50.pth"])
    assert check_initial_weights(cfg) == {"init": None, "imagenet": "/w/resnet50.pth"}
    assert Path(cfg.backbone.pretrained) == Path("/w/resnet50.pth")


def test_init_lifts_the_imagenet_requirement_and_skips_the_imagenet_file(tmp_path, monkeypatch):
    from cakes.weights import check_initial_weights

    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    ckpt = tmp_path / "given.ckpt"
    ckpt.write_bytes(b"")
    cfg = compose_config("train", ["experiment=ssv1_cakes", f"init={ckpt}", "backbone.pretrained=/w/resnet50.pth"])
    assert check_initial_weights(cfg) == {"init": str(ckpt), "imagenet": None}
    assert cfg.backbone.pretrained is None  # the checkpoint supplies every weight
    cfg = compose_config("train", ["experiment=ssv1_cakes", f"init={tmp_path / 'missing.ckpt'}"])
    with pytest.raises(FileNotFoundError, match="init=.*missing.ckpt: checkpoint file not found"):
        check_initial_weights(cfg)
