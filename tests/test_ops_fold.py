"""Batch norms folded into convolutions (``cakes.ops.fold_batch_norms``): the folded network computes
the eval-mode function of the original (every execution the plan can pick, both layouts), no batch
norm is left, the original is untouched, and what cannot be folded says where and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cakes.backbones import C2FNAS, ResNet3d
from cakes.ops import CakesConv3d, ConvNorm, Derived, Homogeneous, fold_batch_norms, plan
from cakes.ops.arch import load_arch
from cakes.ops.fold import fold_output_affine, norm_affine
from test_benchmarks import load

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last_3d
WIDTH = 0.125


def randomise_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their defaults, so a fold that ignored any
    of them (or the order of channels) changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) * 2 - 1)
    return net


def resnet(operator) -> ResNet3d:
    torch.manual_seed(0)
    return randomise_norms(ResNet3d(operator=operator, depth=50, width=WIDTH, num_classes=7)).eval()


def published(name: str) -> Derived:
    network = load("network")
    return Derived(network.fit_arch(load_arch(ROOT / "archs" / f"{name}.yaml"), ResNet3d.slots(depth=50, width=WIDTH)))


def count_batch_norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize(
    "operator",
    [Homogeneous("c3d"), Homogeneous("p3d"), "ssv1_cakes12d_c", "ssv1_cakes123d_p"],
    ids=["c3d", "p3d", "12d_c", "123d_p"],
)
@pytest.mark.parametrize("layout", ["channels_last", "ncdhw"])
def test_folded_resnet_computes_the_eval_function_without_batch_norms(operator, layout):
    net = resnet(published(operator) if isinstance(operator, str) else operator)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norms(net)
    assert count_batch_norms(net) == 53 and count_batch_norms(folded) == 0
    with torch.no_grad():
        want, got = net(x), folded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    after = net.state_dict()  # the original is a separate, unchanged network
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("execution", plan.EXECUTIONS)
def test_a_folded_cakes_layer_matches_conv_then_norm_in_every_execution(execution):
    """The fold gives a layer a bias: every execution the plan can choose runs it."""
    torch.manual_seed(0)
    slot = ConvNorm(CakesConv3d(16, {"3x3x3": 5, "1x3x3": 7, "3x1x1": 4}), nn.BatchNorm3d(16))
    slot = randomise_norms(slot).eval()
    folded = fold_batch_norms(slot)
    assert isinstance(folded.norm, nn.Identity) and folded.conv.bias is not None
    x = torch.randn(1, 16, 4, 10, 10).contiguous(memory_format=CL)
    previous = plan.mode()
    try:
        plan.configure(execution)
        with torch.no_grad():
            want, got = slot(x), folded(x)
    finally:
        plan.configure(previous)
        plan.clear()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fold_updates_an_existing_bias_and_keeps_channel_order():
    conv = CakesConv3d(3, {"1x3x3": 2, "3x3x3": 3}, bias=True)
    x = torch.randn(1, 3, 4, 6, 6)
    scale, shift = torch.arange(1.0, 6.0), torch.arange(10.0, 15.0)
    with torch.no_grad():
        want = conv(x) * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1)
        fold_output_affine(conv, scale, shift, "layer")
        got = conv(x)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"CakesConv3d: expected scale and shift of shape \(5,\)"):
        fold_output_affine(conv, scale[:4], shift[:4], "layer")


def test_norm_affine_is_the_eval_batch_norm():
    norm = randomise_norms(nn.BatchNorm3d(6)).eval()
    z = torch.randn(2, 6, 3, 4, 4)
    scale, shift = norm_affine(norm)
    with torch.no_grad():
        assert torch.allclose(norm(z), z * scale.view(1, -1, 1, 1, 1) + shift.view(1, -1, 1, 1, 1), atol=1e-6)


class Shuffle(nn.Module):
    """A slot "convolution" without weights: nothing to fold a norm into."""

    out_channels = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


def test_fold_refuses_a_training_network_and_says_where_it_cannot_fold():
    with pytest.raises(ValueError, match="training mode"):
        fold_batch_norms(resnet(Homogeneous("c3d")).train())
    slot = ConvNorm(Shuffle(), nn.BatchNorm3d(4)).eval()
    with pytest.raises(TypeError, match="conv: cannot fold a batch norm of 4 channels into Shuffle"):
        fold_batch_norms(slot)
    with pytest.raises(ValueError, match="without running statistics"):
        fold_batch_norms(ConvNorm(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4, track_running_stats=False)).eval())


def test_instance_norms_are_kept():
    """C2FNAS normalises each input by its own statistics: nothing to fold, the function unchanged."""
    torch.manual_seed(0)
    net = C2FNAS(operator=Homogeneous("c3d"), width=0.125, num_classes=2).eval()
    x = torch.randn(1, 1, *[C2FNAS.MIN_INPUT_SIZE] * 3)
    folded = fold_batch_norms(net)
    with torch.no_grad():
        assert torch.equal(net(x), folded(x))
