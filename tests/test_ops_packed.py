"""The ``packed`` execution (``cakes.ops.cpu.packed``): inference with each group's weight packed once
into oneDNN's layout (and 1x1x1 convolutions run so). Same values as the dense form; the cache never
serves a stale weight (changed in place, storage swapped, folded) and forgets freed ones; it runs
only where it applies."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.nn import functional as F

from cakes.ops import CakesConv3d, fold_batch_norms, plan
from cakes.ops.cpu.switch import fast_path
from cakes.ops.cpu.units import fill_block
from cakes.ops.cpu import packed, torch_shim
from cakes.ops.pointwise import PointwiseConv3d
from test_ops_conv_fastpath import CL, dense_reference

pytestmark = [
    pytest.mark.skipif(not torch_shim.PACKED_CONVOLUTION, reason="this torch build has no oneDNN packed convolution"),
    pytest.mark.usefixtures("fresh_plan"),
    pytest.mark.plan_mode("packed"),
]


def _op(counts, stride=1, bias=True, seed=0) -> CakesConv3d:
    torch.manual_seed(seed)
    return CakesConv3d(6, counts, stride=stride, bias=bias).to(memory_format=CL).eval()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("stride", [1, (1, 2, 2), 2], ids=str)
@pytest.mark.parametrize(
    "counts",
    [{"3x3x3": 7}, {"1x3x3": 4, "3x1x1": 5}, {"3x3x3": 2, "1x3x3": 3, "3x1x1": 4}, {"1x1x3": 3, "3x3x1": 2}],
    ids=lambda c: "+".join(c),
)
def test_packed_values_equal_the_dense_form(counts, stride, batch):
    op = _op(counts, stride, bias=batch == 1, seed=batch)
    x = torch.randn(batch, 6, 5, 7, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        assert plan.choose(x, list(op.weights.values()), op.subkernels, op.stride, op.bias, 3) == "packed"
        y = op(x)
        assert y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y, dense_reference(op, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(op(x), y, atol=0, rtol=0)  # the cached copies give the same result


def test_each_weight_is_packed_once_and_reused():
    op = _op({"1x3x3": 4, "3x1x1": 5})
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)

    def packed_copies() -> list[torch.Tensor]:
        return [
            packed.packed_weight(((g, 0, w.shape[0]),), (w,), w.detach, tuple(x.shape), (1, 1, 1), sub.padding)
            for g, (w, sub) in enumerate((op.weights[sub.name], sub) for sub in op.subkernels)
        ]

    with torch.no_grad():
        op(x)
        first = packed_copies()
        op(x)
        again = packed_copies()
        assert packed.packed_count() == 2  # no other form made: the op ran these
    assert packed.packed_count() == 2 and all(a is b for a, b in zip(first, again, strict=True))


def test_a_weight_changed_in_place_or_swapped_is_repacked():
    op = _op({"3x3x3": 3, "1x3x3": 4})
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        op(x)
        op.weights["1x3x3"].mul_(-2.0)  # an optimiser step, load_state_dict: the version moves
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)
        op.weights["3x3x3"].data = torch.randn_like(op.weights["3x3x3"])  # new storage, version may not move
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)


def test_folding_batch_norms_in_place_repacks_the_folded_weights():
    torch.manual_seed(4)
    net = torch.nn.Sequential(_op({"1x3x3": 4, "3x1x1": 5}, bias=False), torch.nn.BatchNorm3d(9)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        want = net(x)  # packs the unfolded weights
        fold_batch_norms(net, inplace=True)
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


def test_freed_weights_are_forgotten():
    op = _op({"1x3x3": 4, "3x1x1": 5})
    with torch.no_grad():
        op(torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL))
    assert packed.packed_count() == 2
    del op
    gc.collect()
    assert packed.packed_count() == 0


def test_packed_runs_only_for_channels_last_float32_inference():
    op = _op({"1x3x3": 4, "3x1x1": 5})
    weights = list(op.weights.values())
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    assert plan.choose(x, weights, op.subkernels, op.stride, op.bias, 3) == "fused"  # gradients needed
    with torch.no_grad():
        assert plan.choose(x.contiguous(), weights, op.subkernels, op.stride, op.bias, 3) == "fused"  # NCDHW
        assert plan.choose(x.double(), weights, op.subkernels, op.stride, op.bias, 3) == "fused"
    y = op(x.requires_grad_(True))  # forced packed with gradients: the fused execution, gradients intact
    y.sum().backward()
    assert x.grad is not None and all(w.grad is not None for w in weights)
    assert packed.packed_count() == 0


def test_dense_runs_packed_like_the_all_3d_layer_and_packs_its_padded_weight_once(monkeypatch):
    """Where the all-3D layer of a shape runs packed, ``dense`` does too, with the zero-padded weight
    built and packed once per change of the groups (not per call: C3D's cost)."""

    def measure(x, weights, subs, stride, bias, kernel_size):
        return {"grouped": 2.0, "packed": 1.0} if len(subs) == 1 else {"fused": 3.0, "dense": 1.0}

    monkeypatch.setattr(plan, "_measure", measure)
    plan.configure("benchmark")
    op = _op({"3x3x3": 2, "1x3x3": 3, "3x1x1": 4}, stride=(1, 2, 2))
    weights = [op.weights[sub.name] for sub in op.subkernels]  # in group order, as the plan passes them
    x = torch.randn(1, 6, 4, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)
        assert set(plan.choices().values()) == {"dense", "packed"} and packed.packed_count() == 1

        def unbuilt() -> torch.Tensor:
            raise AssertionError("the padded weight was rebuilt although no group changed")

        dense = ("dense", 3)
        again = packed.packed_weight(dense, tuple(weights), unbuilt, tuple(x.shape), (1, 2, 2), (1, 1, 1))
        assert again is packed.packed_weight(dense, tuple(weights), unbuilt, tuple(x.shape), (1, 2, 2), (1, 1, 1))
        weights[2].add_(1.0)  # one group changes: rebuilt and repacked
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)


def test_the_fast_path_switch_turns_packed_weights_off():
    op = _op({"1x3x3": 4, "3x1x1": 5})
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad(), fast_path(False):
        assert "packed" not in plan.candidate_executions(x, op.subkernels, op.stride, 3)
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)
    assert packed.packed_count() == 0


def test_inputs_of_many_shapes_keep_only_the_latest_forms_per_weight():
    op = _op({"3x3x3": 3})
    with torch.no_grad():
        for frames in range(2, 4 + packed.MAX_FORMS):
            x = torch.randn(1, 6, frames, 5, 5).contiguous(memory_format=CL)
            torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)
    assert packed.packed_count() == packed.MAX_FORMS


def test_a_partial_block_is_filled_with_the_next_groups_rows():
    """As in the fused execution, the 3x3x3 group's idle block lanes take the leading 1x3x3 rows
    (zero-padded): two packed convolutions, not one per group plus a nearly empty block."""
    op = _op({"3x3x3": 3, "1x3x3": 20}, bias=True)
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)
        block = fill_block(x)
        assert block in (8, 16) and packed.packed_count() == 2
        op.weights["1x3x3"][:1].mul_(3.0)  # a row that rides in the 3x3x3 unit
        torch.testing.assert_close(op(x), dense_reference(op, x), atol=1e-5, rtol=1e-5)


def test_inference_mode_weights_are_packed_uncached_and_planning_works_there():
    """Under ``torch.inference_mode`` (Lightning's test and predict loops) a weight made there has no
    version counter: it is packed per call, never cached. Benchmark-mode planning, which also times
    ``dense`` (whose padded weight is made there), runs and keeps the values."""
    op = _op({"3x3x3": 2, "1x3x3": 3, "3x1x1": 4})
    x = torch.randn(1, 6, 4, 5, 5).contiguous(memory_format=CL)
    with torch.inference_mode():
        w = torch.randn(5, 6, 1, 3, 3)
        assert w.is_inference()
        first = packed.packed_weight(((0, 0, 5),), (w,), w.detach, tuple(x.shape), (1, 1, 1), (0, 1, 1))
        assert packed.packed_count() == 0 and first is not packed.packed_weight(
            ((0, 0, 5),), (w,), w.detach, tuple(x.shape), (1, 1, 1), (0, 1, 1)
        )
        plan.configure("benchmark")
        y = op(x)
        assert any(key[4] is False for key in plan.timings())
    with torch.no_grad():
        torch.testing.assert_close(y, dense_reference(op, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 2), (2, 2, 2)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_pointwise_convolutions_equal_conv3d_and_pack_their_weight_once(stride, bias, monkeypatch):
    monkeypatch.setattr(plan, "choose_pointwise", lambda *args: "packed")
    torch.manual_seed(0)
    conv = PointwiseConv3d(6, 20, stride=stride, bias=bias).to(memory_format=CL).eval()
    x = torch.randn(1, 6, 4, 5, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        y = conv(x)
        assert y.is_contiguous(memory_format=CL) and packed.packed_count() == 1
        torch.testing.assert_close(y, F.conv3d(x, conv.weight, conv.bias, stride), atol=1e-5, rtol=1e-5)
        conv.weight.mul_(2)  # an in-place change (a batch-norm fold) is repacked
        torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, stride), atol=1e-5, rtol=1e-5)
        assert packed.packed_count() == 1
    with pytest.raises(TypeError, match="float64"):
        packed.packed_pointwise_conv3d(x.double(), conv.weight, None, stride)


def test_pointwise_plan_times_packed_in_inference_only():
    plan.configure("benchmark")
    conv = PointwiseConv3d(8, 16).to(memory_format=CL)
    x = torch.randn(1, 8, 2, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        conv(x)
    conv(x.requires_grad_())
    timed = {key[4]: set(times) for key, times in plan.pointwise_timings().items()}
    assert timed == {False: {"gemm", "conv3d", "packed"}, True: {"gemm", "conv3d"}}
