"""The execution plan of ``CakesConv3d`` (``cakes.ops.plan``): every execution it can choose keeps
the operator's contract ``op(x) == F.conv3d(x, op.to_dense(), stride, padding=k // 2)`` with the
same gradients; benchmark mode measures once per key and keeps the fastest; deterministic mode and
the fixed modes never measure."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cakes.ops import OP_SETS, CakesConv3d, SubKernel, plan
from cakes.ops import frames as frames_module
from cakes.ops import im2col, time_split
from cakes.ops.homogeneous import HOMOGENEOUS_OPS, HomogeneousConv3d
from test_ops_conv_fastpath import CL, dense_reference, random_counts

pytestmark = pytest.mark.usefixtures("fresh_plan")


def check_contract(op: CakesConv3d, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Values and gradients (input, every weight, bias) of ``op`` against the dense form."""
    x = x.detach().requires_grad_(True)
    params = [x, *op.parameters()]
    y = op(x)
    ref = dense_reference(op, x)
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-5)
    gy = torch.randn_like(ref) * 0.1
    for name, g, w in zip(
        ["x", *(n for n, _ in op.named_parameters())],
        torch.autograd.grad(y, params, gy),
        torch.autograd.grad(ref, params, gy),
        strict=True,
    ):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(op(x), ref, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("execution", plan.EXECUTIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
@pytest.mark.parametrize("stride", [1, (1, 2, 2)], ids=str)
@pytest.mark.parametrize("op_set", ["c123d", "v123d"])
def test_every_execution_keeps_the_contract(execution, op_set, stride, channels_last):
    rng = random.Random(f"{execution}{op_set}{stride}{channels_last}")
    torch.manual_seed(rng.randint(0, 2**31))
    op = CakesConv3d(
        5, random_counts(OP_SETS[op_set].names, rng.randint(7, 13), rng), stride=stride, bias=rng.random() < 0.5
    )
    x = torch.randn(2, 5, 6, 7, 6)  # even length: every execution runs as itself
    if channels_last:
        x, op = x.contiguous(memory_format=CL), op.to(memory_format=CL)
    plan.configure(execution)
    check_contract(op, x)
    assert plan.timings() == {}  # a fixed mode never measures


@pytest.mark.parametrize("execution", plan.EXECUTIONS)
def test_every_execution_kernel5_float64_and_gradcheck(execution):
    plan.configure(execution)
    torch.manual_seed(1)
    op5 = CakesConv3d(3, {"5x5x5": 2, "5x1x1": 3, "1x5x5": 2}, kernel_size=5, bias=True)
    check_contract(op5, torch.randn(2, 3, 4, 6, 6))
    op = CakesConv3d(2, {"3x3x3": 1, "1x3x3": 2, "3x1x1": 1}, stride=(1, 2, 2), bias=True).double()
    x = torch.randn(1, 2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: op(x), (x, *op.parameters()), eps=1e-6, atol=1e-7)


def test_benchmark_mode_measures_once_per_key_and_keeps_the_fastest(monkeypatch):
    measured = []
    fake = {"fused": 3.0, "grouped": 2.0, "dense": 1.0}

    def measure(x, weights, subs, stride, bias, kernel_size):
        if len(subs) == 1:  # the all-3D layer "dense" runs as (measured on its first call)
            return {"grouped": 1.0}
        measured.append(plan.plan_key(x, weights, subs, stride, bias))
        return dict(fake)

    def mixed_choices() -> list[str]:
        return sorted(choice for key, choice in plan.choices().items() if len(key[6]) > 1)

    monkeypatch.setattr(plan, "_measure", measure)
    torch.manual_seed(2)
    op = CakesConv3d(4, {"3x3x3": 3, "1x3x3": 5})
    x = torch.randn(1, 4, 3, 5, 5)
    check_contract(op, x)  # train (grad) and inference (no_grad): two keys
    check_contract(op, x)  # cached: no new measurement
    assert len(measured) == 2 and measured[0][4] is True and measured[1][4] is False
    assert mixed_choices() == ["dense", "dense"]
    fake.update(fused=0.5)
    check_contract(op, x.contiguous(memory_format=CL))  # another layout: new keys, the new fastest
    check_contract(op, torch.randn(1, 4, 3, 6, 5))  # another shape: new keys
    assert len(measured) == 6
    assert mixed_choices() == ["dense", "dense", "fused", "fused", "fused", "fused"]
    other = CakesConv3d(4, {"3x3x3": 5, "1x3x3": 3})  # other counts: another key
    other(x)
    assert len(measured) == 7


def test_real_measurement_times_every_candidate_without_touching_grads():
    torch.manual_seed(3)
    op = CakesConv3d(8, {"3x3x3": 5, "1x3x3": 6, "3x1x1": 5}, bias=True).to(memory_format=CL)
    x = torch.randn(1, 8, 4, 6, 6).contiguous(memory_format=CL).requires_grad_(True)  # batch 1: split is a candidate
    rng_before = torch.get_rng_state()
    y = op(x)
    assert torch.equal(torch.get_rng_state(), rng_before)  # timing draws nothing: resumed runs draw alike
    assert all(p.grad is None for p in op.parameters()) and x.grad is None
    (key, times), (inner_key, inner_times) = sorted(plan.timings().items(), key=lambda kv: -len(kv[0][6]))
    training = set(plan.EXECUTIONS) - {"packed"}  # packed weights are for inference only
    assert key[4] is True and set(times) == training and all(0 < t < 60 for t in times.values())
    assert plan.choices()[key] == plan.pick(times)
    assert inner_key[6] == (("3x3x3", 16),) and "dense" not in inner_times  # what "dense" ran as
    y.sum().backward()  # the chosen execution's graph is intact
    assert x.grad is not None and all(p.grad is not None for p in op.parameters())


def test_inference_measurement_also_times_packed_weights():
    torch.manual_seed(3)
    op = CakesConv3d(8, {"3x3x3": 5, "1x3x3": 6, "3x1x1": 5}, bias=True).to(memory_format=CL)
    x = torch.randn(1, 8, 4, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad():
        y = op(x)
        (key, times), _ = sorted(plan.timings().items(), key=lambda kv: -len(kv[0][6]))
        assert key[4] is False and set(times) == set(plan.EXECUTIONS)
        assert plan.choices()[key] == plan.pick(times)
        torch.testing.assert_close(y, dense_reference(op, x), atol=1e-5, rtol=1e-5)
        assert "packed" not in plan.candidate_executions(x.contiguous(), op.subkernels, op.stride, 3)  # NCDHW
        assert "packed" not in plan.candidate_executions(x, op.subkernels, op.stride, 3, needs_grad=True)


def test_pick_keeps_the_plain_execution_unless_another_is_clearly_faster():
    assert plan.pick({"fused": 1.0, "grouped": 1.04, "frames": 1.2}) == "grouped"  # within the margin
    assert plan.pick({"fused": 1.0, "grouped": 1.06, "frames": 1.2}) == "fused"
    assert plan.pick({"grouped": 2.0, "split": 1.0}) == "split"
    assert plan.pick({"dense": 1.0, "fused": 0.9}) == "fused"  # no plain candidate: the fastest


def test_deterministic_mode_follows_the_rule_without_measuring(monkeypatch):
    monkeypatch.setattr(plan, "_measure", lambda *a: pytest.fail("deterministic mode must not measure"))
    mostly_3d = CakesConv3d(4, {"3x3x3": 7, "1x3x3": 1})  # MACs 7·27 + 9 of 8·27: 0.92 -> dense
    mostly_2d = CakesConv3d(4, {"3x3x3": 1, "1x3x3": 7})  # 0.42 -> fused
    x = torch.randn(1, 4, 3, 5, 5)
    weights = lambda op: [op.weights[s.name] for s in op.subkernels]  # noqa: E731
    assert plan.rule(mostly_3d.subkernels, weights(mostly_3d), 3) == "dense"
    assert plan.rule(mostly_2d.subkernels, weights(mostly_2d), 3) == "fused"
    plan.configure("deterministic")
    for op in (mostly_3d, mostly_2d):
        check_contract(op, x)
    plan.configure("benchmark")
    torch.use_deterministic_algorithms(True)
    try:
        check_contract(mostly_3d, x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert plan.choices() == {} and plan.timings() == {}


def test_mac_counters_and_meta_tensors_see_the_groups_in_every_mode(monkeypatch):
    monkeypatch.setattr(plan, "_measure", lambda *a: pytest.fail("counting must not measure"))
    counts = {"3x3x3": 3, "1x3x3": 2, "3x1x1": 4}
    op = CakesConv3d(6, counts, stride=(1, 2, 2))
    x = torch.randn(2, 6, 5, 9, 9)
    closed = 2 * 5 * 5 * 5 * 6 * sum(SubKernel.parse(n).volume * c for n, c in counts.items())
    for mode in ("dense", "benchmark"):
        plan.configure(mode)
        with FlopCounterMode(display=False) as counter:
            op(x)
        assert counter.get_total_flops() == 2 * closed
        with torch.device("meta"):
            assert CakesConv3d(6, counts)(torch.empty(1, 6, 2, 3, 3)).shape == (1, 9, 2, 3, 3)


def test_configure_and_environment_variable_validate_the_mode():
    with pytest.raises(ValueError, match=r"conv plan: unknown conv plan mode 'fast'; expected one of \['benchmark'"):
        plan.configure("fast")
    env = {**os.environ, plan.ENV_VAR: "bogus"}
    code = "import cakes.ops"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "environment variable CAKES_CONV_PLAN: unknown conv plan mode 'bogus'" in done.stderr
    env[plan.ENV_VAR] = "Dense"
    done = subprocess.run(
        [sys.executable, "-c", "from cakes.ops import plan; print(plan.mode())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "dense"


def test_train_config_sets_the_plan():
    from cakes.config import compose_train_config

    assert compose_train_config([]).conv_plan == os.environ.get(plan.ENV_VAR, "benchmark")
    assert compose_train_config(["conv_plan=dense"]).conv_plan == "dense"


@pytest.mark.parametrize("frames", [1, 2, 4], ids=lambda t: f"T{t}")
def test_frames_execution_shift_sums_at_every_clip_length(frames):
    """Frame-wise execution: 2-D banks over the N·T frames and the shift-sum along time, down to
    clips shorter than the kernel (every off-centre row falls outside at T = 1)."""
    plan.configure("frames")
    torch.manual_seed(frames)
    op = CakesConv3d(4, {"3x3x3": 3, "3x3x1": 2, "1x3x3": 2, "3x1x1": 2, "1x1x3": 1}, bias=True)
    x = torch.randn(2, 4, frames, 5, 6)
    check_contract(op, x)
    check_contract(op.to(memory_format=CL), x.contiguous(memory_format=CL))
    assert frames_of(op, x) == {(3, 3): 3 * 3 + 2, (3, 1): 3 * 2, (1, 1): 3 * 2, (1, 3): 1}


def frames_of(op: CakesConv3d, x: torch.Tensor) -> dict[tuple[int, int], int]:
    """Rows of each 2-D bank the frame-wise execution of ``op`` runs."""
    rows = frames_module.bank_rows(tuple(op.subkernels))
    return {size: sum(op.group_sizes[g] for g, _ in entries) for size, entries in rows}


@pytest.mark.parametrize("frames", [2, 4, 8], ids=lambda t: f"T{t}")
def test_split_execution_runs_the_halves_with_their_halo(frames):
    """Time-split execution: both halves of the clip as a batch, each full-temporal group reading its
    halo frames, at every even length (T = 2: one frame per half, all of it halo-dependent)."""
    plan.configure("split")
    torch.manual_seed(frames)
    op = CakesConv3d(4, {"3x3x3": 3, "3x3x1": 2, "1x3x3": 2, "3x1x1": 2}, stride=(1, 2, 1), bias=True)
    x = torch.randn(1, 4, frames, 5, 6)
    check_contract(op, x)
    check_contract(op.to(memory_format=CL), x.contiguous(memory_format=CL))
    assert plan.choose(x, list(op.weights.values()), op.subkernels, op.stride, op.bias, 3) == "split"


def test_split_execution_needs_an_even_length_and_unit_temporal_stride():
    torch.manual_seed(7)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 3})
    odd = torch.randn(1, 3, 5, 4, 4)
    weights = [op.weights[s.name] for s in op.subkernels]
    with pytest.raises(
        ValueError, match=r"time-split execution needs stride 1 and an even length .* \(1, 3, 5, 4, 4\)"
    ):
        time_split.time_split_conv3d(odd, weights, op.subkernels, op.stride, None)
    assert "split" not in plan.candidate_executions(odd, op.subkernels, op.stride, 3)
    assert "split" not in plan.candidate_executions(torch.randn(2, 3, 4, 4, 4), op.subkernels, op.stride, 3)
    assert "split" in plan.candidate_executions(torch.randn(1, 3, 4, 4, 4), op.subkernels, op.stride, 3)
    plan.configure("split")
    assert plan.choose(odd, weights, op.subkernels, op.stride, None, 3) == "fused"
    check_contract(op, odd)


@pytest.mark.parametrize("weight_layout", [CL, torch.contiguous_format], ids=["cl_weights", "ncdhw_weights"])
@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2), (1, 2, 1)], ids=str)
def test_im2col_execution_gradcheck_at_every_stride_and_weight_layout(stride, weight_layout):
    """Im2col: one GEMM per group over its patch matrix (taps outer, channels inner), the weight read
    in place when channels-last and copied otherwise; the patch gradients scattered back per tap."""
    plan.configure("im2col")
    torch.manual_seed(11)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 2, "3x1x1": 1, "1x1x3": 1}, stride=stride, bias=True).double()
    op = op.to(memory_format=weight_layout)
    x = torch.randn(2, 3, 5, 4, 5, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    weights = [op.weights[s.name] for s in op.subkernels]
    assert plan.choose(x, weights, op.subkernels, op.stride, op.bias, 3) == "im2col"
    check_contract(op, x, atol=1e-10)
    assert op(x).is_contiguous(memory_format=CL)
    assert torch.autograd.gradcheck(lambda x, *p: op(x), (x, *op.parameters()), eps=1e-6, atol=1e-7)


def test_im2col_execution_is_offered_only_while_its_patch_matrices_are_small(monkeypatch):
    torch.manual_seed(12)
    op = CakesConv3d(4, {"3x3x3": 2, "1x3x3": 3})
    x = torch.randn(1, 4, 4, 6, 6)
    weights = [op.weights[s.name] for s in op.subkernels]
    elements = 4 * 6 * 6 * (27 + 9) * 4
    assert im2col.patch_elements(x, op.subkernels, op.stride) == elements
    assert "im2col" in plan.candidate_executions(x, op.subkernels, op.stride, 3)
    monkeypatch.setattr(im2col, "MAX_PATCH_ELEMENTS", elements - 1)
    assert "im2col" not in plan.candidate_executions(x, op.subkernels, op.stride, 3)
    with pytest.raises(ValueError, match=rf"im2col execution: .* \(1, 4, 4, 6, 6\) .* {elements} elements"):
        im2col.im2col_conv3d(x, weights, op.subkernels, op.stride, None)
    plan.configure("im2col")  # a forced im2col plan runs such a layer fused
    assert plan.choose(x, weights, op.subkernels, op.stride, None, 3) == "fused"
    check_contract(op, x)


def test_frames_execution_needs_unit_temporal_stride():
    torch.manual_seed(5)
    op = CakesConv3d(3, {"3x3x3": 2, "1x3x3": 3}, stride=(2, 1, 1))
    x = torch.randn(1, 3, 6, 5, 5)
    weights = [op.weights[s.name] for s in op.subkernels]
    with pytest.raises(ValueError, match=r"frame-wise execution needs stride 1 along the first axis, got stride \(2"):
        frames_module.frame_conv3d(x, weights, op.subkernels, op.stride, None)
    assert "frames" not in plan.candidate_executions(x, op.subkernels, op.stride, 3)
    assert "frames" in plan.candidate_executions(x, op.subkernels, (1, 2, 2), 3)
    plan.configure("frames")  # a forced frame-wise plan runs such a layer fused
    assert plan.choose(x, weights, op.subkernels, op.stride, None, 3) == "fused"
    check_contract(op, x)


@pytest.mark.parametrize("execution", plan.EXECUTIONS)
@pytest.mark.parametrize("kind", sorted(HOMOGENEOUS_OPS))
def test_homogeneous_convs_run_the_plan_and_keep_their_values(kind, execution):
    """Baselines (C3D, C2D, P3D, ...) get the same executions as CAKES layers; depthwise steps stay
    plain grouped convolutions."""
    torch.manual_seed(6)
    op = HomogeneousConv3d(4, 6, kind, stride=(1, 2, 2)).to(memory_format=CL)
    x = torch.randn(2, 4, 3, 7, 7).contiguous(memory_format=CL).requires_grad_(True)

    def plain(x: torch.Tensor) -> torch.Tensor:
        for step in op:
            x = torch.nn.functional.conv3d(x, step.weight, None, step.stride, step.subkernel.padding, 1, step.groups)
        return x

    plan.configure(execution)
    y, ref = op(x), plain(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    inputs = [x, *op.parameters()]
    for got, want in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(ref, inputs, gy), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plan.configure("benchmark")
    op(x)
    steps = {(step.subkernel.name, step.out_channels) for step in op if step.groups == 1}
    planned = {key[6][0] for key in plan.choices() if len(key[6]) == 1 and key[6][0][0] != "3x3x3"}
    assert steps - {("3x3x3", 6)} == planned  # each dense step measured and cached (3x3x3 also via "dense")


def test_using_runs_a_block_under_another_mode_and_restores_it():
    plan.configure("dense")
    with plan.using("grouped"):
        assert plan.mode() == "grouped" and os.environ[plan.ENV_VAR] == "grouped"
    assert plan.mode() == "dense" and os.environ[plan.ENV_VAR] == "dense"
    with pytest.raises(RuntimeError), plan.using("frames"):
        raise RuntimeError
    assert plan.mode() == "dense"


def test_dense_runs_as_the_all_3d_layer_of_the_same_shape_runs(monkeypatch):
    """``dense`` is the C3D layer's own execution (its cached choice), so choosing it costs what C3D costs."""
    measured = []

    def measure(x, weights, subs, stride, bias, kernel_size):
        measured.append(tuple(sub.name for sub in subs))
        return {"grouped": 2.0, "split": 1.0} if len(subs) == 1 else {"fused": 3.0, "dense": 1.0}

    ran = []
    monkeypatch.setattr(plan, "_measure", measure)
    monkeypatch.setitem(plan.EXECUTE, "split", lambda *a: ran.append("split") or time_split.time_split_conv3d(*a[:5]))
    torch.manual_seed(8)
    op = CakesConv3d(4, {"3x3x3": 5, "1x3x3": 1})
    x = torch.randn(1, 4, 4, 5, 5)
    check_contract(op, x)
    assert measured == [("3x3x3", "1x3x3"), ("3x3x3",), ("3x3x3", "1x3x3"), ("3x3x3",)]  # train, then no_grad keys
    assert set(plan.choices().values()) == {"dense", "split"} and ran
    c3d = HomogeneousConv3d(4, 6, "c3d")  # the all-3D layer of the same shape: the same cached choice
    c3d(x)
    assert len(measured) == 4
    plan.configure("deterministic")  # one-group layers never recurse into "dense"
    torch.testing.assert_close(c3d(x), torch.nn.functional.conv3d(x, c3d[0].weight, padding=1))
    check_contract(CakesConv3d(4, {"3x3x3": 7, "1x3x3": 1}), x)
