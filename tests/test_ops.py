"""The CAKES operator library: sub-kernel vocabulary, CakesConv3d semantics, homogeneous ops,
inflation and closed-form counts."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from cakes.ops import (
    HOMOGENEOUS_OPS,
    OP_SETS,
    CakesConv3d,
    HomogeneousConv3d,
    SubKernel,
    inflate_2d,
    inflate_2d_grouped,
    resolve_op_set,
)
from cakes.profile import profile

STRIDES = [1, (1, 2, 2), 2]


def random_counts(op_set: str, total: int, rng: random.Random) -> dict[str, int]:
    names = list(OP_SETS[op_set].names)
    cuts = sorted(rng.randint(0, total) for _ in range(len(names) - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    return dict(zip(names, sizes, strict=True))


# --- vocabulary -------------------------------------------------------------------------------
def test_subkernel_parse_properties():
    sub = SubKernel.parse("3x1x1")
    assert sub.size == (3, 1, 1) and sub.volume == 3 and sub.rank == 1
    assert sub.padding == (1, 0, 0)
    assert sub.centre_slice == (slice(0, 3), slice(1, 2), slice(1, 2))
    assert SubKernel.parse("1x5x5", k=5).padding == (0, 2, 2)
    assert sub.params_per_output_channel(64) == 192
    assert SubKernel.parse("3x3x3").macs_per_output_element(10, groups=2) == 135


@pytest.mark.parametrize(
    "name, fragment",
    [("3x3", "'3x3'"), ("axbxc", "'axbxc'"), ("3x2x3", "2"), ("5x3x3", "5"), ("", "''"), ("3x3x3x3", "3x3x3x3")],
)
def test_subkernel_bad_names_name_the_value(name, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        SubKernel.parse(name)


def test_kernel_larger_than_k_is_rejected():
    with pytest.raises(ValueError, match="larger than the kernel"):
        SubKernel.parse("5x5x5", k=3)


def test_op_sets_match_the_paper():
    assert OP_SETS["c12d"].names == ("1x3x3", "3x1x1")
    assert OP_SETS["c23d"].names == ("3x3x3", "1x3x3")
    assert OP_SETS["c123d"].names == ("3x3x3", "1x3x3", "3x1x1")
    assert set(OP_SETS["v1d"].names) == {"3x1x1", "1x3x1", "1x1x3"}
    assert set(OP_SETS["v2d"].names) == {"1x3x3", "3x1x3", "3x3x1"}
    assert len(OP_SETS["v123d"]) == 7 and "1x1x1" not in OP_SETS["v123d"].names


def test_user_declared_op_set():
    custom = resolve_op_set({"name": "mine", "subkernels": ["3x3x1", "1x1x3"]})
    assert custom.name == "mine" and custom.names == ("3x3x1", "1x1x3")
    assert resolve_op_set(["1x3x3"]).names == ("1x3x3",)
    with pytest.raises(ValueError, match="unknown op set 'c4d'"):
        resolve_op_set("c4d")
    with pytest.raises(ValueError, match="twice"):
        resolve_op_set(["1x3x3", "1x3x3"])


def test_negative_and_bad_counts_raise():
    with pytest.raises(ValueError, match="'1x3x3' is negative"):
        CakesConv3d(4, {"3x3x3": 2, "1x3x3": -1})
    with pytest.raises(ValueError, match="bad sub-kernel '3x4x3'"):
        CakesConv3d(4, {"3x4x3": 2})
    with pytest.raises(ValueError, match="zero output channels"):
        CakesConv3d(4, {"3x3x3": 0})
    with pytest.raises(ValueError, match="must be an integer"):
        CakesConv3d(4, {"3x3x3": 1.5})


# --- CakesConv3d semantics --------------------------------------------------------------------
@pytest.mark.parametrize("op_set", sorted(OP_SETS))
@pytest.mark.parametrize("stride", STRIDES, ids=str)
def test_cakes_conv_equals_dense_form(op_set, stride):
    rng = random.Random(f"{op_set}{stride}")
    torch.manual_seed(0)
    in_ch, out_ch = 5, 11  # in != out on purpose
    counts = random_counts(op_set, out_ch, rng)
    op = CakesConv3d(in_ch, counts, stride=stride, bias=True)
    x = torch.randn(2, in_ch, 5, 7, 6, requires_grad=True)
    out = op(x)
    dense_w = op.to_dense()
    ref = F.conv3d(x, dense_w, op.bias, stride=stride, padding=1)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    # gradients match the dense form's (input, and weights through to_dense); float64 so that
    # reduction order cannot hide a real difference
    op, x = op.double(), x.detach().double().requires_grad_(True)
    out = op(x)
    ref = F.conv3d(x, op.to_dense(), op.bias, stride=stride, padding=1)
    grad = torch.randn_like(out)
    params = [x, *op.weights.values(), op.bias]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("op_set", sorted(OP_SETS))
def test_from_dense_to_dense_is_masking(op_set):
    rng = random.Random(op_set)
    counts = random_counts(op_set, 9, rng)
    w = torch.randn(9, 4, 3, 3, 3)
    op = CakesConv3d.from_dense(w, counts)
    masked = torch.zeros_like(w)
    row = 0
    for name, n in counts.items():
        sub = SubKernel.parse(name)
        idx = (slice(row, row + n), slice(None), *sub.centre_slice)
        masked[idx] = w[idx]
        row += n
    torch.testing.assert_close(op.to_dense(), masked, atol=0, rtol=0)


def test_zero_counts_are_skipped_but_remembered():
    op = CakesConv3d(3, {"3x3x3": 0, "1x3x3": 4, "3x1x1": 2})
    assert [s.name for s in op.subkernels] == ["1x3x3", "3x1x1"]
    assert op.out_channels == 6
    assert op.counts == {"3x3x3": 0, "1x3x3": 4, "3x1x1": 2}
    assert set(op.weights) == {"1x3x3", "3x1x1"}


def test_from_dense_rejects_wrong_rows():
    with pytest.raises(ValueError, match="sum to 5 but the weight has 6 rows"):
        CakesConv3d.from_dense(torch.randn(6, 2, 3, 3, 3), {"3x3x3": 2, "1x3x3": 3})


def test_gradcheck_double():
    torch.manual_seed(0)
    op = CakesConv3d(2, {"3x3x3": 1, "1x3x3": 2, "3x1x1": 1}, stride=(1, 2, 2)).double()
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))


# --- homogeneous operators --------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(HOMOGENEOUS_OPS))
@pytest.mark.parametrize("stride", STRIDES, ids=str)
def test_homogeneous_ops_with_different_widths(kind, stride):
    op = HomogeneousConv3d(6, 9, kind, stride=stride)
    x = torch.randn(2, 6, 4, 8, 8)
    out = op(x)
    st = (stride,) * 3 if isinstance(stride, int) else stride
    assert out.shape == (2, 9, *(math.ceil(n / s) for n, s in zip((4, 8, 8), st, strict=True)))
    assert op.out_channels == 9


def test_homogeneous_recipes():
    p3d = HomogeneousConv3d(8, 8, "p3d")
    assert [m.subkernel.name for m in p3d] == ["1x3x3", "3x1x1"]
    ir = HomogeneousConv3d(8, 8, "ir_csn")
    assert ir[0].groups == 8 and ir[0].weight.shape == (8, 1, 3, 3, 3)
    ip = HomogeneousConv3d(8, 8, "ip_csn")
    assert [m.subkernel.name for m in ip] == ["1x1x1", "3x3x3"] and ip[1].groups == 8
    d21 = HomogeneousConv3d(8, 8, "d21d")
    assert [(m.subkernel.name, m.groups) for m in d21] == [("1x3x3", 8), ("3x1x1", 8)]
    assert [m.subkernel.name for m in HomogeneousConv3d(4, 4, "volp3d")] == ["3x3x1", "1x1x3"]
    with pytest.raises(ValueError, match="unknown homogeneous operator 'c4d'"):
        HomogeneousConv3d(4, 4, "c4d")


# --- inflation --------------------------------------------------------------------------------
def test_inflation_rules():
    w2d = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(inflate_2d(w2d, "1x3x3"), w2d.unsqueeze(2))
    w3d = inflate_2d(w2d, "3x3x3")
    assert w3d.shape == (4, 3, 3, 3, 3)
    for t in range(3):
        torch.testing.assert_close(w3d[:, :, t], w2d / 3)
    w1d = inflate_2d(w2d, "3x1x1")
    assert w1d.shape == (4, 3, 3, 1, 1)
    for t in range(3):
        torch.testing.assert_close(w1d[:, :, t, 0, 0], w2d.sum(dim=(2, 3)) / 3)
    # volume axes: 1x3x1 sums over W only
    torch.testing.assert_close(inflate_2d(w2d, "1x3x1")[:, :, 0, :, 0], w2d.sum(dim=3))


def test_inflation_on_a_static_clip_matches_2d_response():
    """A 3D/2D inflated kernel on a temporally constant clip reproduces the 2D conv per frame."""
    torch.manual_seed(0)
    w2d = torch.randn(6, 3, 3, 3)
    frame = torch.randn(1, 3, 9, 9)
    clip = frame.unsqueeze(2).repeat(1, 1, 5, 1, 1)
    ref = F.conv2d(frame, w2d, padding=1)
    for name in ("3x3x3", "1x3x3"):
        out = F.conv3d(clip, inflate_2d(w2d, name), padding=SubKernel.parse(name).padding)
        torch.testing.assert_close(out[:, :, 2], ref, atol=1e-5, rtol=1e-5)


def test_grouped_inflation_partitions_rows_in_order():
    w2d = torch.randn(10, 4, 3, 3)
    groups = inflate_2d_grouped(w2d, {"3x3x3": 3, "1x3x3": 5, "3x1x1": 2})
    torch.testing.assert_close(groups["3x3x3"], inflate_2d(w2d[:3], "3x3x3"))
    torch.testing.assert_close(groups["1x3x3"], inflate_2d(w2d[3:8], "1x3x3"))
    torch.testing.assert_close(groups["3x1x1"], inflate_2d(w2d[8:], "3x1x1"))
    op = CakesConv3d(4, {"3x3x3": 3, "1x3x3": 5, "3x1x1": 2})
    assert op.inflate_from_2d(w2d) == ["weights.3x3x3", "weights.1x3x3", "weights.3x1x1"]
    torch.testing.assert_close(op.weights["1x3x3"], groups["1x3x3"])


# --- counting ---------------------------------------------------------------------------------
@pytest.mark.parametrize("op_set", sorted(OP_SETS))
def test_params_and_macs_closed_form(op_set):
    rng = random.Random(op_set + "macs")
    in_ch, out_ch, shape = 7, 12, (4, 10, 10)
    counts = random_counts(op_set, out_ch, rng)
    op = CakesConv3d(in_ch, counts, stride=(1, 2, 2))
    out_vox = 4 * 5 * 5
    closed_params = sum(SubKernel.parse(n).params_per_output_channel(in_ch) * c for n, c in counts.items())
    closed_macs = out_vox * sum(SubKernel.parse(n).macs_per_output_element(in_ch) * c for n, c in counts.items())
    result = profile(op, (1, in_ch, *shape))
    assert result.params == closed_params
    assert result.macs == closed_macs
    with FlopCounterMode(display=False) as counter:
        op(torch.zeros(1, in_ch, *shape))
    assert counter.get_total_flops() == 2 * closed_macs


@pytest.mark.parametrize("kind", sorted(HOMOGENEOUS_OPS))
def test_homogeneous_macs_match_flop_counter(kind):
    op = HomogeneousConv3d(8, 8, kind, stride=(1, 2, 2))
    result = profile(op, (2, 8, 4, 8, 8))
    with FlopCounterMode(display=False) as counter:
        op(torch.zeros(2, 8, 4, 8, 8))
    assert counter.get_total_flops() == 2 * result.macs
    assert result.params == sum(p.numel() for p in op.parameters())


def test_linear_macs_are_counted():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    assert profile(net, (3, 3, 4)).macs == 3 * 12 * 5
