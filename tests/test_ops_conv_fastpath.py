"""The CPU fast path of ``CakesConv3d`` (``cakes.ops.cpu.function.cakes_conv3d``) against the dense form.

Every case compares values and gradients (input, every group's weight, bias) with
``F.conv3d(x, op.to_dense(), stride, padding=k // 2)``, whose gradients reach the same parameters
through the differentiable ``to_dense``.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from cakes.ops import OP_SETS, CakesConv3d, SubKernel, plan
from cakes.ops.cpu.function import cakes_conv3d

STRIDES = [1, (1, 2, 2), 2]
ALL_SUBKERNELS = ["3x3x3", "1x3x3", "3x1x3", "3x3x1", "3x1x1", "1x3x1", "1x1x3", "1x1x1"]
CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def fused_execution(monkeypatch):
    """This file tests the fused execution itself: no execution plan (see test_ops_plan.py)."""
    monkeypatch.setenv(plan.ENV_VAR, plan.mode())
    previous = plan.mode()
    plan.configure("fused")
    yield
    plan.configure(previous)


def random_counts(names, total: int, rng: random.Random) -> dict[str, int]:
    cuts = sorted(rng.randint(0, total) for _ in range(len(names) - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    return dict(zip(names, sizes, strict=True))


def dense_reference(op: CakesConv3d, x: torch.Tensor) -> torch.Tensor:
    return F.conv3d(x, op.to_dense(), op.bias, stride=op.stride, padding=op.kernel_size // 2)


def compare(op: CakesConv3d, x: torch.Tensor, atol: float = 1e-5, grad_layout=None) -> torch.Tensor:
    """Forward and backward of ``op`` vs the dense form; returns the op's output."""
    x = x.detach().requires_grad_(True)
    params = [x, *op.parameters()]
    y = op(x)
    assert y.grad_fn is not None and y.grad_fn.name() == "CakesConvCPUBackward"
    ref = dense_reference(op, x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-5)
    gy = torch.randn_like(ref) * 0.1
    if grad_layout is not None:
        gy = gy.contiguous(memory_format=grad_layout)
    got = torch.autograd.grad(y, params, gy)
    want = torch.autograd.grad(ref, params, gy)
    for name, g, w in zip(["x", *(n for n, _ in op.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    return y


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
@pytest.mark.parametrize("stride", STRIDES, ids=str)
@pytest.mark.parametrize("op_set", sorted(OP_SETS))
def test_fast_path_matches_dense(op_set, stride, channels_last):
    rng = random.Random(f"{op_set}{stride}{channels_last}")
    torch.manual_seed(rng.randint(0, 2**31))
    in_ch, out_ch = 5, rng.randint(7, 13)
    op = CakesConv3d(in_ch, random_counts(OP_SETS[op_set].names, out_ch, rng), stride=stride, bias=rng.random() < 0.5)
    x = torch.randn(2, in_ch, 5, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    y = compare(op, x)
    if channels_last:
        assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
def test_wide_groups_chunked_forward_and_block_fill(channels_last):
    """Groups wider than the channels-last forward chunk (32) and not multiples of the oneDNN
    block (16): the 3x3x3 rows run in chunks, the block fill moves 1x3x3 rows into them."""
    torch.manual_seed(4)
    op = CakesConv3d(6, {"3x3x3": 70, "1x3x3": 37, "3x1x1": 21}, bias=True)
    x = torch.randn(2, 6, 3, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    compare(op, x, atol=2e-5)


@pytest.mark.parametrize("name", ALL_SUBKERNELS)
def test_single_group_every_subkernel(name):
    """Every sub-kernel alone, both layouts, every stride including temporal-only (channels-last
    1xkxk / kx1x1 convolutions run as 2-D ones where their strides allow)."""
    torch.manual_seed(0)
    for stride in [*STRIDES, (2, 1, 1)]:
        op = CakesConv3d(3, {name: 5}, stride=stride, bias=True)
        x = torch.randn(2, 3, 5, 6, 7)
        compare(op, x)
        compare(op, x.contiguous(memory_format=CL), grad_layout=CL)


def test_zero_counts_kernel5_short_clips_and_gradient_layouts():
    torch.manual_seed(1)
    op = CakesConv3d(4, {"3x3x3": 0, "1x3x3": 3, "3x1x1": 0, "1x1x1": 2, "1x3x1": 4}, stride=(1, 2, 2))
    assert [s.name for s in op.subkernels] == ["1x3x3", "1x1x1", "1x3x1"]
    compare(op, torch.randn(2, 4, 3, 5, 5), grad_layout=CL)
    # k = 5: five temporal taps on clips shorter than the kernel
    op5 = CakesConv3d(3, {"5x5x5": 2, "5x1x1": 3, "1x5x5": 2}, kernel_size=5, bias=True)
    for frames in (1, 2, 4):
        compare(op5, torch.randn(2, 3, frames, 6, 6))
    # an expanded (stride-0) upstream gradient, as from y.sum().backward()
    op = CakesConv3d(4, {"3x3x3": 2, "3x1x1": 3})
    x = torch.randn(1, 4, 4, 5, 5, requires_grad=True)
    op(x).sum().backward()
    ref_x = x.detach().requires_grad_(True)
    dense_reference(op, ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)


def test_only_weights_or_only_input_require_grad():
    torch.manual_seed(2)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 3, "3x1x1": 4}, stride=(1, 2, 2), bias=True)
    x = torch.randn(2, 3, 4, 6, 6)
    ref_grads = torch.autograd.grad(dense_reference(op, x).square().sum(), list(op.parameters()))
    grads = torch.autograd.grad(op(x).square().sum(), list(op.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    op.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(op(xg).square().sum(), [xg])
    (rx,) = torch.autograd.grad(dense_reference(op, xg).square().sum(), [xg])
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_set", sorted(OP_SETS))
def test_no_grad_forward_and_float64(op_set):
    rng = random.Random(op_set)
    torch.manual_seed(3)
    op = CakesConv3d(4, random_counts(OP_SETS[op_set].names, 9, rng), stride=(1, 2, 2), bias=True)
    x = torch.randn(2, 4, 5, 7, 7)
    with torch.no_grad():
        y = op(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y, dense_reference(op, x), atol=1e-5, rtol=1e-5)
    op64 = op.double()
    torch.testing.assert_close(op64(x.double()), dense_reference(op64, x.double()), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "op_set, stride", [("c123d", 1), ("c123d", (1, 2, 2)), ("v123d", 2), ("c12d", 2), ("v1d", (1, 2, 2))]
)
def test_gradcheck_float64(op_set, stride):
    torch.manual_seed(4)
    counts = {name: 1 + i % 2 for i, name in enumerate(OP_SETS[op_set].names)}
    op = CakesConv3d(2, counts, stride=stride, bias=True).double()
    names = [n for n, _ in op.named_parameters()]
    x = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(op, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *op.parameters()), eps=1e-6, atol=1e-7)


def test_meta_device_and_flop_counter_see_the_plain_convolutions():
    counts = {"3x3x3": 3, "1x3x3": 2, "3x1x1": 4, "1x1x1": 1}
    op = CakesConv3d(6, counts, stride=(1, 2, 2), bias=True)
    with torch.device("meta"):
        meta_op = CakesConv3d(6, counts, stride=(1, 2, 2), bias=True)
        y = meta_op(torch.empty(2, 6, 5, 9, 9))
    assert y.device.type == "meta" and y.shape == (2, 10, 5, 5, 5)
    x = torch.randn(2, 6, 5, 9, 9)
    closed = 2 * 5 * 5 * 5 * 6 * sum(SubKernel.parse(n).volume * c for n, c in counts.items())
    with FlopCounterMode(display=False) as counter:
        y = op(x)
    assert counter.get_total_flops() == 2 * closed
    torch.testing.assert_close(y, dense_reference(op, x), atol=1e-5, rtol=1e-5)


def test_torch_func_transforms_use_the_plain_path():
    torch.manual_seed(5)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 1, "3x1x1": 2}, bias=True)
    x = torch.randn(1, 3, 3, 4, 4)
    got = torch.func.grad(lambda x: op(x).square().sum())(x)
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(dense_reference(op, xr).square().sum(), [xr])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # with an output permutation (performance-priority slots): the weighting makes the order matter
    out_index = torch.tensor([3, 0, 4, 1, 2])
    scale = torch.arange(1.0, 6.0).view(1, -1, 1, 1, 1)
    weights, subs = [op.weights[s.name] for s in op.subkernels], op.subkernels

    def loss(x):
        return (cakes_conv3d(x, weights, subs, op.stride, op.bias, out_index=out_index) * scale).square().sum()

    got = torch.func.grad(loss)(x)
    (want,) = torch.autograd.grad(loss(xr), [xr])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_fill_moves_contained_channels_into_the_previous_convolution():
    from cakes.ops.cpu.units import plan_units

    subs = [SubKernel.parse(n) for n in ("3x3x3", "1x3x3", "3x1x1")]
    units = plan_units(subs, [21, 21, 22], (1, 1, 1), 16)
    assert [(u.start, u.stop, u.parts) for u in units] == [
        (0, 32, ((0, 0, 21), (1, 0, 11))),  # 11 of the 1x3x3 channels fill the 3x3x3 block
        (32, 42, ((1, 11, 21),)),
        (42, 64, ((2, 0, 22),)),  # 3x1x1 is not inside 1x3x3; it runs as matrix products
    ]
    assert units[2].matmul
    # a matrix-product group partly absorbed, and a group absorbed whole
    subs = [SubKernel.parse(n) for n in ("3x3x1", "3x1x1", "1x1x1")]
    assert [u.parts for u in plan_units(subs, [3, 30, 2], (1, 1, 1), 16)] == [
        ((0, 0, 3), (1, 0, 13)),
        ((1, 13, 30),),
        ((2, 0, 2),),
    ]
    assert [u.parts for u in plan_units(subs, [3, 4, 2], (1, 1, 1), 16)] == [((0, 0, 3), (1, 0, 4)), ((2, 0, 2),)]
    torch.manual_seed(6)
    for counts in ({"3x3x3": 21, "1x3x3": 21, "3x1x1": 22}, {"3x3x1": 3, "3x1x1": 30, "1x1x1": 2}):
        for stride in STRIDES:
            compare(CakesConv3d(6, counts, stride=stride, bias=True), torch.randn(2, 6, 5, 6, 7))


def test_double_backward_through_the_fast_path():
    torch.manual_seed(7)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 3, "3x1x1": 2}, stride=(1, 2, 2), bias=True)
    x = torch.randn(2, 3, 4, 5, 5, requires_grad=True)
    results = []
    for forward in (op, lambda x: dense_reference(op, x)):
        y = forward(x)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *op.parameters()]))
        if forward is op:
            assert y.grad_fn.name() == "CakesConvCPUBackward"
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
@pytest.mark.parametrize("stride", [1, (1, 2, 2)], ids=str)
def test_out_index_writes_rows_to_their_channels(channels_last, stride):
    """``out_index`` = the plain op followed by the channel permutation, values and gradients,
    with a bias (per output channel) and a kx1x1 group (the matmul path)."""
    gen = torch.Generator().manual_seed(3)
    counts = {"3x3x3": 21, "1x3x3": 19, "3x1x1": 24}
    op = CakesConv3d(9, counts, stride=stride, bias=True)
    with torch.no_grad():
        op.bias.normal_(generator=gen)
    out_index = torch.randperm(64, generator=gen)
    x = torch.randn(2, 9, 5, 8, 7, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(True)
    subs = op.subkernels
    weights = [op.weights[sub.name] for sub in subs]
    y = cakes_conv3d(x, weights, subs, op.stride, op.bias, out_index=out_index)
    inverse = torch.argsort(out_index)
    ref = (cakes_conv3d(x, weights, subs, op.stride) + op.bias[out_index].view(1, -1, 1, 1, 1))[:, inverse]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, [x, op.bias, *weights], gy)
    ref_grads = torch.autograd.grad(ref, [x, op.bias, *weights], gy)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the no-grad forward and the plain path (taken under a dispatch mode) agree
        torch.testing.assert_close(cakes_conv3d(x, weights, subs, op.stride, op.bias, out_index=out_index), ref)
        with FlopCounterMode(display=False):
            plain = cakes_conv3d(x, weights, subs, op.stride, op.bias, out_index=out_index)
        torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    with FlopCounterMode(display=False):  # the plain path's gradients (inverse-permutation backward)
        plain = cakes_conv3d(x, weights, subs, op.stride, op.bias, out_index=out_index)
        plain_grads = torch.autograd.grad(plain, [x, op.bias, *weights], gy)
    for got, want in zip(plain_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
def test_stride1_input_gradient_accumulates_in_onednn_and_without_it(channels_last, monkeypatch):
    """At stride 1 the input gradient of every group (the kx1x1 one too) after the first is an
    accumulating oneDNN forward convolution reading the output-gradient channels in place; with that
    op unavailable the per-group ``convolution_backward`` path gives the same gradients. Backward
    twice (retain_graph)."""
    from cakes.ops.cpu import backward, torch_shim

    assert torch_shim.convolution_add_ is not None, "this PyTorch build should provide mkldnn._convolution_pointwise_"
    calls, adds = [], []
    input_grad, conv_add = backward.accumulate_input_grad, torch_shim.convolution_add_
    monkeypatch.setattr(backward, "accumulate_input_grad", lambda *a: calls.append(a[3].name) or input_grad(*a))

    def spy_add(acc, x, *rest):
        adds.append(x.shape[1])  # the gradient channels a group adds
        return conv_add(acc, x, *rest)

    monkeypatch.setattr(torch_shim, "convolution_add_", spy_add)
    torch.manual_seed(8)
    op = CakesConv3d(6, {"3x3x3": 19, "1x3x3": 20, "3x1x1": 21}, bias=True)
    x = torch.randn(2, 6, 4, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    compare(op, x)
    assert calls == ["3x3x3", "1x3x3", "3x1x1"]
    assert adds == [20, 21]  # every group after the first adds in place (its gradient channels)
    x = x.detach().requires_grad_(True)
    y = op(x)
    gy = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, *op.parameters()], gy, retain_graph=True)
    second = torch.autograd.grad(y, [x, *op.parameters()], gy)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    calls.clear()
    adds.clear()
    monkeypatch.setattr(torch_shim, "convolution_add_", None)
    compare(op, x)
    assert calls == ["3x3x3", "1x3x3"] and adds == []  # kx1x1: matrix products; the rest summed


def test_conv_views_of_unit_axes():
    """Which channels-last convolutions run as 2-D ones, and that their views share memory and invert."""
    from cakes.ops.cpu.views import ConvView

    x = torch.randn(2, 6, 4, 5, 3).contiguous(memory_format=CL)
    assert ConvView.of(SubKernel.parse("1x3x3"), (1, 2, 2), x) == ConvView("frames", [2, 2], [1, 1])
    assert ConvView.of(SubKernel.parse("3x1x1"), (2, 1, 1), x) == ConvView("pixels", [2, 1], [1, 0])
    for name, stride in [("1x3x3", (2, 1, 1)), ("3x1x1", (1, 2, 2)), ("3x3x3", (1, 1, 1)), ("3x1x3", (1, 1, 1))]:
        assert ConvView.of(SubKernel.parse(name), stride, x).kind == "3d"
    assert ConvView.of(SubKernel.parse("1x3x3"), (1, 1, 1), x.contiguous()).kind == "3d"  # NCDHW
    assert ConvView.of(SubKernel.parse("1x3x3"), (1, 1, 1), x.double()).kind == "3d"  # no oneDNN for float64
    for view in (ConvView("frames", [1, 1], [1, 1]), ConvView("pixels", [1, 1], [1, 0])):
        for t in (x, x[:, 2:5]):  # a channel slice has the views too
            v = view.view(t)
            assert v.dim() == 4 and v.data_ptr() == t.data_ptr()
            assert torch.equal(view.unview(v, t), t)
