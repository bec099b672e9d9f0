"""``PointwiseConv3d``: a 1x1x1 ``nn.Conv3d`` that can run as one GEMM on a channels-last CPU input.

Whichever way it runs, values and gradients are those of ``F.conv3d`` with its weight; the GEMM runs
only where it is meant to (channels-last, fast path on, no FLOP counter, not exporting), and there
the execution plan picks it or ``F.conv3d`` per input key."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cakes.ops import fast_path, plan
from cakes.ops.pointwise import PointwiseConv3d
from cakes.profile import profile

CL = torch.channels_last_3d

pytestmark = pytest.mark.usefixtures("fresh_plan")


def spy_linear(monkeypatch) -> list[int]:
    calls: list[int] = []
    linear = F.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return linear(*args, **kwargs)

    monkeypatch.setattr(F, "linear", counting)
    return calls


@pytest.mark.parametrize("execution", plan.POINTWISE_EXECUTIONS)
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 2), (2, 1, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_conv3d(execution, layout, stride, bias, monkeypatch):
    monkeypatch.setattr(plan, "choose_pointwise", lambda *args: execution)
    calls = spy_linear(monkeypatch)
    torch.manual_seed(0)
    conv = PointwiseConv3d(6, 5, stride=stride, bias=bias).double().to(memory_format=CL)
    x = torch.randn(2, 6, 4, 5, 7, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    y = conv(x)
    # a training call cannot run packed: it runs the GEMM
    assert len(calls) == (1 if layout is CL and execution in ("gemm", "packed") else 0)
    plain = torch.nn.Conv3d(6, 5, 1, stride=stride, bias=bias).double().to(memory_format=CL)
    plain.load_state_dict(conv.state_dict())
    ref_x = x.detach().clone().requires_grad_()
    ref = plain(ref_x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref)
    if layout is CL:
        assert y.is_contiguous(memory_format=CL)
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad)
    if bias:
        torch.testing.assert_close(conv.bias.grad, plain.bias.grad)


def test_gradcheck_of_the_gemm():
    plan.configure("fused")  # a fixed mode: the GEMM
    conv = PointwiseConv3d(3, 4, stride=(1, 2, 2), bias=True).double()
    x = torch.randn(1, 3, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(conv, (x,))


def test_plain_conv_when_switched_off_counted_or_exported(monkeypatch):
    calls = spy_linear(monkeypatch)
    conv = PointwiseConv3d(4, 8)
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=CL)
    with fast_path(False):
        conv(x)
    assert calls == []
    assert profile(conv, tuple(x.shape)).macs == 8 * 4 * 2 * 3 * 3  # the counter sees a convolution
    assert calls == []
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    conv(x)
    assert calls == []


def test_state_dict_is_that_of_nn_conv3d():
    conv = PointwiseConv3d(4, 8, stride=(1, 2, 2), bias=True)
    plain = torch.nn.Conv3d(4, 8, 1, stride=(1, 2, 2), bias=True)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 2, 6, 6).contiguous(memory_format=CL)
    torch.testing.assert_close(conv(x), plain(x))


@pytest.mark.parametrize("backbone", ["resnet3d", "c2fnas"])
def test_backbones_use_them_and_compute_what_the_plain_modules_compute(backbone):
    """Every 1x1x1 conv of both backbones is a ``PointwiseConv3d`` (every C2FNAS norm the layout-keeping
    instance norm), and a whole network gives the same outputs and gradients with them on and off."""
    from cakes.backbones import C2FNAS, ResNet3d
    from cakes.ops import Homogeneous
    from cakes.ops.norm import InstanceNorm3d

    torch.manual_seed(0)
    if backbone == "resnet3d":
        net = ResNet3d(operator=Homogeneous("c3d"), depth=50, width=0.125, num_classes=5)
        x = torch.randn(2, 3, 4, 32, 32)
    else:
        net = C2FNAS(operator=Homogeneous("c3d"), width=0.125, num_classes=3)
        x = torch.randn(1, 1, 32, 32, 32)
        assert all(type(m) is InstanceNorm3d for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    pointwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (1, 1, 1)]
    assert pointwise and all(type(m) is PointwiseConv3d for m in pointwise)
    net = net.double().to(memory_format=CL)
    x = x.double().contiguous(memory_format=CL)

    def run():
        torch.manual_seed(1)  # the same dropout masks
        net.zero_grad()
        y = net(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in net.parameters()]

    y_fast, grads_fast = run()
    with fast_path(False):
        y_plain, grads_plain = run()
    torch.testing.assert_close(y_fast, y_plain)
    for a, b in zip(grads_fast, grads_plain, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_benchmark_mode_times_both_once_per_key_and_keeps_the_choice(train, monkeypatch):
    """The first call of a key times ``gemm``, ``conv3d`` and, in inference, ``packed``, and caches
    :func:`plan.pick`'s choice (``conv3d`` kept unless another is the margin faster); later calls of
    that key measure nothing."""
    torch.manual_seed(0)
    conv = PointwiseConv3d(8, 6, stride=(1, 2, 2)).to(memory_format=CL)
    x = torch.randn(1, 8, 2, 6, 6).contiguous(memory_format=CL).requires_grad_(train)
    ref = F.conv3d(x.detach(), conv.weight.detach(), stride=(1, 2, 2))
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(conv(x), ref)
    (key,) = plan.pointwise_timings()
    times = plan.pointwise_timings()[key]
    timed = {"gemm", "conv3d"} if train else {"gemm", "conv3d", "packed"}
    assert set(times) == timed and all(0 < t < float("inf") for t in times.values())
    assert key[4] is train and plan.pointwise_choices() == {key: plan.pick(times, keep="conv3d")}
    calls = spy_linear(monkeypatch)
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(conv(x), ref)
    assert plan.pointwise_timings() == {key: times}  # no second measurement
    assert len(calls) == (1 if plan.pointwise_choices()[key] == "gemm" else 0)
    plan.clear()
    assert plan.pointwise_choices() == {} and plan.pointwise_timings() == {}


@pytest.mark.parametrize("mode", ["deterministic", *plan.EXECUTIONS])
def test_other_plan_modes_run_the_gemm_without_timing(mode, monkeypatch):
    calls = spy_linear(monkeypatch)
    plan.configure(mode)
    conv = PointwiseConv3d(4, 8)
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=CL)
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight))
    assert len(calls) == 1 and plan.pointwise_timings() == {}


def test_deterministic_algorithms_run_the_gemm_without_timing(monkeypatch):
    calls = spy_linear(monkeypatch)
    conv = PointwiseConv3d(4, 8)
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=CL)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        conv(x)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(calls) == 1 and plan.pointwise_timings() == {}


def test_pick_keeps_the_plain_execution_within_the_margin():
    margin = plan.SWITCH_MARGIN
    assert plan.pick({"gemm": 1.0, "conv3d": 1.0 + margin / 2}, keep="conv3d") == "conv3d"
    assert plan.pick({"gemm": 1.0, "conv3d": 1.0 + margin * 2}, keep="conv3d") == "gemm"
    assert plan.pick({"gemm": 1.0, "conv3d": 0.9}, keep="conv3d") == "conv3d"
