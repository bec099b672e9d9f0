"""The CPU fast-path switch (``CAKES_FAST_PATH`` / ``cakes.ops.set_fast_path``) and the torch shim.

Off, ``CakesConv3d`` runs the reference per-group form; on, the fast path. Either way
``op(x) == F.conv3d(x, op.to_dense())``, gradients included, and the two agree with each other.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from cakes.ops import CakesConv3d, fast_path, fast_path_enabled, plan, set_fast_path
from cakes.ops.cpu import function, switch, torch_shim
from test_ops_conv_fastpath import CL, dense_reference

COUNTS = {"3x3x3": 5, "1x3x3": 6, "3x1x1": 7}  # a kx1x1 group: the matrix-product kernels too


@pytest.fixture(autouse=True)
def fused_execution_and_switch_restored(monkeypatch):
    """The fused execution (no plan), and the switch and its variable as they were."""
    monkeypatch.setenv(plan.ENV_VAR, plan.mode())
    monkeypatch.setenv(switch.ENV_VAR, "1" if fast_path_enabled() else "0")
    previous_mode, previous_switch = plan.mode(), fast_path_enabled()
    plan.configure("fused")
    yield
    plan.configure(previous_mode)
    set_fast_path(previous_switch)


def spy_executions(monkeypatch) -> dict[str, int]:
    """Count the fast forward and the reference form as ``cakes_conv3d`` calls them."""
    counts = {"fast": 0, "reference": 0}
    fast_forward, grouped = function.fast_forward, function.grouped_conv3d

    def fast(*args):
        counts["fast"] += 1
        return fast_forward(*args)

    def reference(*args):
        counts["reference"] += 1
        return grouped(*args)

    monkeypatch.setattr(function, "fast_forward", fast)
    monkeypatch.setattr(function, "grouped_conv3d", reference)
    return counts


def run(op: CakesConv3d, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    x = x.detach().requires_grad_(True)
    y = op(x)
    return y, torch.autograd.grad(y, [x, *op.parameters()], gy)


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
@pytest.mark.parametrize("stride", [1, (1, 2, 2)], ids=str)
def test_switch_selects_the_execution_and_both_match_dense(channels_last, stride, monkeypatch):
    torch.manual_seed(0)
    op = CakesConv3d(4, COUNTS, stride=stride, bias=True)
    x = torch.randn(2, 4, 4, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    gy = torch.randn_like(dense_reference(op, x))
    counts = spy_executions(monkeypatch)
    results = {}
    for enabled in (True, False):
        with fast_path(enabled):
            y, grads = run(op, x, gy)
            with torch.no_grad():
                y_eval = op(x)
        assert (y.grad_fn.name() == "CakesConvCPUBackward") is enabled
        xr = x.detach().requires_grad_(True)
        ref = dense_reference(op, xr)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_eval, ref.detach(), atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, torch.autograd.grad(ref, [xr, *op.parameters()], gy), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        results[enabled] = (y, *grads)
    # on: the Function's forward and the no-grad forward; off: the reference form for both
    assert counts == {"fast": 2, "reference": 2}
    for on, off in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(on, off, atol=1e-4, rtol=1e-5)


def test_set_fast_path_and_context_manager(monkeypatch):
    monkeypatch.delenv(switch.ENV_VAR)
    set_fast_path(True)
    with fast_path(False):
        assert not fast_path_enabled() and os.environ[switch.ENV_VAR] == "0"
        with fast_path(True):
            assert fast_path_enabled() and os.environ[switch.ENV_VAR] == "1"
        assert not fast_path_enabled()
    assert fast_path_enabled() and os.environ[switch.ENV_VAR] == "1"  # set_fast_path set it
    set_fast_path(False)
    assert not fast_path_enabled() and os.environ[switch.ENV_VAR] == "0"
    x, w = torch.randn(1, 2, 3, 4, 4), [torch.randn(3, 2, 3, 3, 3)]
    assert not switch.fast_path_applies(x, w, None)
    set_fast_path(True)
    assert switch.fast_path_applies(x, w, None)


def test_environment_variable_is_read_at_import():
    code = (
        "import torch; from cakes.ops import CakesConv3d, fast_path_enabled, plan; plan.configure('fused'); "
        "op = CakesConv3d(2, {'3x3x3': 2, '1x3x3': 1}); y = op(torch.randn(1, 2, 3, 4, 4, requires_grad=True)); "
        "print(fast_path_enabled(), y.grad_fn.name())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for value, want in (("off", "False CatBackward0"), ("1", "True CakesConvCPUBackward")):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, switch.ENV_VAR: value}, capture_output=True, text=True, check=True
        ).stdout
        assert out.split("\n")[-2] == want, (value, out)
    bad = subprocess.run(
        [sys.executable, "-c", "import cakes.ops"], env={**env, switch.ENV_VAR: "maybe"}, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "CAKES_FAST_PATH" in bad.stderr and "'maybe'" in bad.stderr


def test_shim_checks_pass_on_the_pinned_torch():
    assert torch_shim.SUPPORTED and torch_shim.UNSUPPORTED_REASON is None
    assert torch_shim._probe_dispatch_checks() is None and torch_shim._probe_convolution_backward() is None
    assert not torch_shim.dispatch_or_transform_active()
    acc, x, w = torch.ones(1, 2, 3, 4), torch.randn(1, 3, 3, 4), torch.randn(2, 3, 3, 1)
    want = F.conv2d(x, w, padding=(1, 0)) + 1
    assert torch_shim.convolution_add_(acc, x, w, [1, 0]) is acc
    torch.testing.assert_close(acc, want)


def test_shim_checks_pass_whatever_the_context_at_import():
    """Imported under a default meta device, float64, inference mode and a FLOP counter, the probes
    still run on float32 CPU tensors and pass."""
    code = (
        "import torch; from torch.utils.flop_counter import FlopCounterMode; torch.set_default_dtype(torch.float64)\n"
        "with torch.device('meta'), torch.inference_mode(), FlopCounterMode(display=False):\n"
        "    from cakes.ops.cpu import torch_shim\n"
        "print(torch_shim.SUPPORTED, torch_shim.convolution_add_ is not None)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "True True" and "disabled" not in done.stderr


def test_shim_failures_disable_the_fast_path(monkeypatch, caplog):
    """A failing probe is reported (no exception); without support every call runs the reference
    form and plans treat every call as traced (closed-form ``fused``)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch_shim, "_probe_convolution_backward", lambda: "convolution_backward is broken")
        assert torch_shim._check() == "convolution_backward is broken"
    with monkeypatch.context() as patch:
        patch.setattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
        assert "does not see a FLOP counter" in torch_shim._probe_dispatch_checks()
    with monkeypatch.context() as patch:
        patch.setattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
        assert "does not see a vmap transform" in torch_shim._probe_dispatch_checks()
    with monkeypatch.context() as patch:

        def missing_kernel(*args):
            raise RuntimeError("no kernel")

        patch.setattr(torch.ops.aten, "convolution_backward", missing_kernel)
        assert "convolution_backward failed" in torch_shim._probe_convolution_backward()
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger=torch_shim.__name__):
        patch.setattr(torch_shim, "_torch_minor", lambda: (9, 9))
        assert torch_shim._check() is None
    assert "tested with torch 2.13" in caplog.text
    monkeypatch.setattr(torch_shim, "SUPPORTED", False)
    assert torch_shim.dispatch_or_transform_active()
    op = CakesConv3d(2, {"3x3x3": 2, "3x1x1": 1})
    x = torch.randn(1, 2, 3, 4, 4)
    assert op(x).grad_fn.name() == "CatBackward0"
    plan.configure("benchmark")
    weights = [op.weights[sub.name] for sub in op.subkernels]
    assert plan.choose(x, weights, op.subkernels, op.stride, None, 3) == "fused"


@pytest.mark.slow
def test_ops_benchmark_ab_times_the_fast_path_on_and_off(capsys):
    from test_benchmarks import load, table_rows

    load("ops").main(
        [
            "--only",
            "res5",
            "--splits",
            "thirds",
            "--layouts",
            "channels_last",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--batch",
            "1",
            "--ab",
        ]
    )
    out = capsys.readouterr().out
    assert "conv plan fused, fast path on" in out
    (_, ab) = table_rows(out)
    on, off, ratio = (float(v) for v in ab[3:6])
    assert on > 0 and off > 0 and ratio == pytest.approx(on / off, abs=0.05 / off * (1 + on / off) + 5e-4)


def test_primitive_cache_capacity_is_raised_unless_the_user_set_it(monkeypatch):
    from cakes.ops.cpu import primitive_cache

    for name in primitive_cache.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")  # the user's choice stays
    assert primitive_cache.raise_capacity() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8192", "LRU_CACHE_CAPACITY": "512"}
    assert primitive_cache.raise_capacity(100) == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8192",
        "LRU_CACHE_CAPACITY": "512",
    }


def test_importing_cakes_ops_raises_the_capacities_before_its_first_convolution():
    """oneDNN reads its cache capacity when it creates its first primitive: the import-time probes of
    ``cakes.ops`` must find it raised (else nine networks in one process re-create primitives every
    step: measured 107–186 cache misses per training step of each CAKES network)."""
    script = """
import os
import torch
from torch.nn import functional as F
seen = []
for name in ("conv2d", "conv3d"):
    original = getattr(F, name)
    def spy(*args, _original=original, **kwargs):
        seen.append(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
        return _original(*args, **kwargs)
    setattr(F, name, spy)
import cakes.ops
assert seen and set(seen) == {"8192"}, seen
print("ok", len(seen))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-2000:]
