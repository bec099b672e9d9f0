"""Execution plan of :class:`~cakes.ops.conv.CakesConv3d`: which of its equivalent executions runs.

A heterogeneous convolution can run in several ways that compute the same function
(``op(x) == F.conv3d(x, op.to_dense(), stride, padding=k // 2)``, gradients included):

* ``fused`` — :func:`~cakes.ops.cpu.function.cakes_conv3d`: one convolution per sub-kernel group
  (on CPU one autograd node writing every group into one output; elsewhere, or with the fast-path
  switch off — :mod:`cakes.ops.cpu.switch` — per-group + concat);
* ``grouped`` — the plain per-group form: ``F.conv3d`` per group, ``torch.cat``, bias;
* ``dense`` — ONE ``kxkxk`` convolution with the sub-kernels zero-padded
  (:func:`~cakes.ops.reference.dense_weight`), run as the all-3D (C3D) layer of the same shape runs
  (the plan's own choice for that one-group layer, or a plain ``F.conv3d`` in the fixed ``dense``
  mode): the cost of the C3D layer plus building the zero-padded weight, so a planned layer is
  never slower than C3D's beyond that copy and measurement noise;
* ``frames`` — :func:`~cakes.ops.frames.frame_conv3d`: the groups' 2-D slices as one 2-D
  convolution per slice size over the ``N·T`` frames, then a shift-sum along the first axis (the
  groups' exact MACs; only with stride 1 along that axis — elsewhere a forced ``frames`` runs ``fused``);
* ``split`` — :func:`~cakes.ops.time_split.time_split_conv3d`: a batch-1 clip as a batch of its two
  halves along the first axis (halo frames included), per-group ``F.conv3d``: the groups' exact MACs
  on oneDNN's path, which PyTorch does not take for small batch-1 CPU inputs (benchmarked on CPU at
  batch 1 only; even length and stride 1 along that axis — elsewhere a forced ``split`` runs ``fused``).
* ``im2col`` — :func:`~cakes.ops.im2col.im2col_conv3d`: each group one GEMM over its input's patch
  matrix, the weight read in place (for weight-bound layers with few output positions; only while the
  patch matrices stay within :data:`~cakes.ops.im2col.MAX_PATCH_ELEMENTS` — elsewhere a forced
  ``im2col`` runs ``fused``);
* ``packed`` — :func:`~cakes.ops.cpu.packed.packed_conv3d`, inference only: each group's weight
  packed once into oneDNN's layout and cached, then one oneDNN convolution per group at any batch
  size, bias fused (channels-last float32 CPU inputs with no gradient needed — elsewhere a forced
  ``packed`` runs ``fused``).

Which is fastest depends on the layer (widths, mix of sub-kernels), the input shape and layout,
the device and whether gradients are needed: grouped convolutions save MACs but oneDNN/cuDNN run
small or thin convolutions at a lower throughput than one wide ``kxkxk`` one. In ``benchmark`` mode
(the default, like ``torch.backends.cudnn.benchmark``) the first call with a new
:func:`plan_key` — (device, dtype, input shape, layout, gradients needed, in-channels, counts,
stride, bias) — times every candidate on that input (interleaved, best of
:data:`BENCHMARK_REPS` after one warm-up; training calls time forward + backward) and caches the
fastest (:func:`pick`: ``grouped`` is kept unless another is :data:`SWITCH_MARGIN` faster);
later calls look it up (a dict lookup: no timing, no host synchronisation). Since
``dense`` is always a candidate, a planned layer is never slower than C3D's by more than the
zero-padded weight's copy and the measurement noise.

Settings (:func:`configure`, or the ``CAKES_CONV_PLAN`` environment variable read at import;
``conv_plan=…`` in the train/search configs sets both):

* ``benchmark`` — measure once per key, cache (default);
* ``fused`` | ``grouped`` | ``dense`` | ``frames`` | ``split`` | ``im2col`` | ``packed`` — always that execution
  (``fused`` = no plan: the behaviour before plans existed);
* ``deterministic=True`` (``CAKES_CONV_PLAN=deterministic``; also implied by
  ``torch.use_deterministic_algorithms(True)``) — no timing: the choice is the fixed
  :func:`rule` of the key, identical on every run and every rank.

The backbones' 1x1x1 convolutions (:class:`~cakes.ops.pointwise.PointwiseConv3d`) have a plan of
their own on channels-last CPU inputs (:func:`choose_pointwise`): one GEMM (``gemm``),
``F.conv3d`` (``conv3d``) or, in inference, a packed oneDNN convolution (``packed``), timed once per
:func:`pointwise_key` in ``benchmark`` mode; every other mode runs ``gemm``.

Counters, fake/meta tensors, tracers (``torch.export``, ONNX, ``torch.compile``) and
``torch.func`` transforms always get ``fused`` (whose plain per-group form they see), whatever the
mode: MAC counts stay the closed form of the groups.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from cakes.ops import frames, im2col, time_split
from cakes.ops.cpu import packed, torch_shim
from cakes.ops.cpu.function import cakes_conv3d
from cakes.ops.reference import dense_weight, grouped_conv3d
from cakes.ops.subkernel import SubKernel
from cakes.utils import env_restored

EXECUTIONS = ("fused", "grouped", "dense", "frames", "split", "im2col", "packed")
#: a 1x1x1 convolution's executions: one matrix product on the channels-last memory, ``F.conv3d``, or
#: (inference only) a oneDNN convolution with its weight packed once
POINTWISE_EXECUTIONS = ("gemm", "conv3d", "packed")
MODES = ("benchmark", "deterministic", *EXECUTIONS)
ENV_VAR = "CAKES_CONV_PLAN"
#: timed runs per candidate after one warm-up run; the fastest run counts (noise only adds time)
BENCHMARK_REPS = 3
#: ``rule``: a group mix whose MACs are at least this share of the dense layer's runs dense
DENSE_MAC_SHARE = 0.75
#: ``pick``: another execution replaces the plain per-group one only if this much faster on its timing
SWITCH_MARGIN = 0.05

PlanKey = tuple
Execute = Callable[[Tensor, Sequence[Tensor], Sequence[SubKernel], tuple[int, int, int], Tensor | None, int], Tensor]


def _fused(x, weights, subs, stride, bias, kernel_size):
    return cakes_conv3d(x, weights, subs, stride, bias)


def _grouped(x, weights, subs, stride, bias, kernel_size):
    return grouped_conv3d(x, weights, subs, stride, bias)


def _dense(x, weights, subs, stride, bias, kernel_size):
    full = [SubKernel((kernel_size,) * 3, kernel_size)]
    dense = [dense_weight(weights, subs, kernel_size)]
    inner = choose(x, dense, full, stride, bias, kernel_size)  # as the all-3D layer of this shape runs
    if inner == "packed":  # the padded weight built and packed once, not per call
        return packed.packed_dense_conv3d(x, weights, subs, stride, bias, kernel_size)
    if inner == "dense":  # forced dense mode or the deterministic rule: a one-group layer has nothing to pad
        inner = "grouped"
    return EXECUTE[inner](x, dense, full, stride, bias, kernel_size)


def _frames(x, weights, subs, stride, bias, kernel_size):
    return frames.frame_conv3d(x, weights, subs, stride, bias)


def _split(x, weights, subs, stride, bias, kernel_size):
    return time_split.time_split_conv3d(x, weights, subs, stride, bias)


def _im2col(x, weights, subs, stride, bias, kernel_size):
    return im2col.im2col_conv3d(x, weights, subs, stride, bias)


def _packed(x, weights, subs, stride, bias, kernel_size):
    if not packed.applies(x, needs_gradient(x, weights, bias)):  # called where it cannot run
        return cakes_conv3d(x, weights, subs, stride, bias)
    return packed.packed_conv3d(x, weights, subs, stride, bias)


#: execution name -> ``fn(x, weights, subs, stride, bias, kernel_size) -> y``, all the same function
EXECUTE: dict[str, Execute] = {
    "fused": _fused,
    "grouped": _grouped,
    "dense": _dense,
    "frames": _frames,
    "split": _split,
    "im2col": _im2col,
    "packed": _packed,
}


def _parse_mode(value: str, where: str) -> str:
    mode = value.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{where}: unknown conv plan mode {value!r}; expected one of {list(MODES)}")
    return mode


class _State:
    mode: str = _parse_mode(os.environ.get(ENV_VAR, "benchmark"), f"environment variable {ENV_VAR}")
    cache: dict[PlanKey, str] = {}
    #: key -> {execution: best seconds} of every measurement made (for reports and tests)
    timings: dict[PlanKey, dict[str, float]] = {}
    #: the same for 1x1x1 convolutions (:func:`choose_pointwise`)
    pointwise_cache: dict[PlanKey, str] = {}
    pointwise_timings: dict[PlanKey, dict[str, float]] = {}


def configure(mode: str) -> None:
    """Set the plan mode for this process (see the module docstring); ``ValueError`` on an unknown one.
    Cached choices stay valid (they depend only on their key)."""
    _State.mode = _parse_mode(mode, "conv plan")
    os.environ[ENV_VAR] = _State.mode  # worker processes (DDP, data loaders) follow


@contextmanager
def using(mode: str) -> Iterator[None]:
    """``with plan.using("grouped"):`` — run a block under another plan mode (e.g. time a network
    with plain per-group ``F.conv3d`` calls, as ``nn.Conv3d`` layers would run), then restore."""
    previous = _State.mode
    with env_restored(ENV_VAR):
        configure(mode)
        try:
            yield
        finally:
            _State.mode = previous


def mode() -> str:
    """The current plan mode."""
    return _State.mode


def clear() -> None:
    """Forget every cached choice and measurement, and every packed weight."""
    _State.cache.clear()
    _State.timings.clear()
    _State.pointwise_cache.clear()
    _State.pointwise_timings.clear()
    packed.clear()


def choices() -> dict[PlanKey, str]:
    """The cached choices ``{key: execution}``."""
    return dict(_State.cache)


def timings() -> dict[PlanKey, dict[str, float]]:
    """Every measurement made: ``{key: {execution: best seconds}}``."""
    return {k: dict(v) for k, v in _State.timings.items()}


def pointwise_choices() -> dict[PlanKey, str]:
    """The cached choices of 1x1x1 convolutions ``{pointwise_key: execution}``."""
    return dict(_State.pointwise_cache)


def pointwise_timings() -> dict[PlanKey, dict[str, float]]:
    """Every 1x1x1 measurement made: ``{pointwise_key: {execution: best seconds}}``."""
    return {k: dict(v) for k, v in _State.pointwise_timings.items()}


def needs_gradient(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None) -> bool:
    """Whether a call on these tensors builds a graph (gradients enabled and any of them requires one)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, *weights))


def plan_key(
    x: Tensor, weights: Sequence[Tensor], subs: Sequence[SubKernel], stride: tuple[int, int, int], bias: Tensor | None
) -> PlanKey:
    """What the choice depends on: device, dtype, input shape and layout, gradients needed, input
    channels, the ordered ``(sub-kernel, channels)`` groups, stride, bias."""
    layout = "channels_last" if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) else "ncdhw"
    groups = tuple((sub.name, w.shape[0]) for sub, w in zip(subs, weights, strict=True))
    return (
        str(x.device),
        x.dtype,
        tuple(x.shape),
        layout,
        needs_gradient(x, weights, bias),
        weights[0].shape[1],
        groups,
        tuple(stride),
        bias is not None,
    )


def rule(subs: Sequence[SubKernel], weights: Sequence[Tensor], kernel_size: int) -> str:
    """The deterministic choice: ``dense`` when the groups' MACs are at least :data:`DENSE_MAC_SHARE`
    of the dense layer's (little to save, and thin convolutions run at a lower throughput), else
    ``fused``."""
    macs = sum(w.shape[0] * sub.volume for w, sub in zip(weights, subs, strict=True))
    dense = sum(w.shape[0] for w in weights) * kernel_size**3
    return "dense" if macs >= DENSE_MAC_SHARE * dense else "fused"


def _traced() -> bool:
    """Counters, fake tensors, tracers, ``torch.compile`` and ``torch.func`` transforms."""
    return torch_shim.dispatch_or_transform_active() or torch.compiler.is_compiling()


def choose(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    kernel_size: int,
) -> str:
    """The execution to run for this call (see the module docstring)."""
    if _traced() or x.device.type == "meta":  # counters see the closed-form MACs of the groups
        return "fused"
    current = _State.mode
    if current in EXECUTIONS:
        return current if runs_here(current, x, subs, stride, needs_gradient(x, weights, bias)) else "fused"
    if current == "deterministic" or torch.are_deterministic_algorithms_enabled():
        return rule(subs, weights, kernel_size)
    key = plan_key(x, weights, subs, stride, bias)
    found = _State.cache.get(key)
    if found is None:
        times = _measure(x, weights, subs, stride, bias, kernel_size)
        _State.timings[key] = times
        found = _State.cache[key] = pick(times)
    return found


def run(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    kernel_size: int,
) -> Tensor:
    """Run a heterogeneous conv with the execution :func:`choose` picks (what every planned layer calls).

    ``x``: ``(N, C_in, T, H, W)``; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``; output
    ``(N, C_out, T', H', W')``, channels in group order."""
    execution = choose(x, weights, subs, stride, bias, kernel_size)
    return EXECUTE[execution](x, weights, subs, stride, bias, kernel_size)


def runs_here(
    execution: str, x: Tensor, subs: Sequence[SubKernel], stride: tuple[int, int, int], needs_grad: bool = False
) -> bool:
    """Whether ``execution`` can run this call: ``frames`` needs unit stride along the first axis,
    ``split`` also an even length, ``im2col`` patch matrices within its limit, ``packed`` a
    channels-last float32 CPU input and no gradient
    (:func:`cakes.ops.cpu.packed.applies`); the others run anywhere."""
    if execution == "frames":
        return frames.supports(subs, stride)
    if execution == "split":
        return time_split.supports(x, stride)
    if execution == "im2col":
        return im2col.supports(x, subs, stride)
    if execution == "packed":
        return packed.applies(x, needs_grad)
    return True


def pick(times: dict[str, float], keep: str = "grouped") -> str:
    """The fastest execution of one layer's timings, except that ``keep`` — the plain one, what
    ``nn.Conv3d`` layers run — is kept unless another beats it by :data:`SWITCH_MARGIN`: a choice
    rests on one first-call timing per candidate, and a layer moved off PyTorch's own execution on a
    few percent of timing noise can run slower inside the network (measured at batch 2, where the
    planned C3D ran up to 8 % slower than plain ``F.conv3d`` before this margin)."""
    fastest = min(times, key=times.__getitem__)
    if keep in times and times[keep] <= times[fastest] * (1 + SWITCH_MARGIN):
        return keep
    return fastest


def candidate_executions(
    x: Tensor, subs: Sequence[SubKernel], stride: tuple[int, int, int], kernel_size: int, needs_grad: bool = False
) -> list[str]:
    """The executions ``benchmark`` mode times for this layer: off CPU ``fused`` is ``grouped``; a single
    full-kernel group is its own ``dense``; ``frames`` needs unit stride along the first axis; ``split``
    is for batch-1 CPU inputs of even length (what PyTorch's CPU heuristic sends off oneDNN);
    ``im2col`` where its patch matrices stay within their limit; ``packed`` for inference calls on
    channels-last float32 CPU inputs."""
    cpu = x.device.type == "cpu"
    candidates = ["fused", "grouped", "dense"] if cpu else ["grouped", "dense"]
    if len(subs) == 1 and subs[0].size == (kernel_size,) * 3:
        candidates.remove("dense")
    if runs_here("frames", x, subs, stride):
        candidates.append("frames")
    if cpu and x.shape[0] == 1 and runs_here("split", x, subs, stride):
        candidates.append("split")
    if runs_here("im2col", x, subs, stride):
        candidates.append("im2col")
    if runs_here("packed", x, subs, stride, needs_grad):
        candidates.append("packed")
    return candidates


def _measure(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    kernel_size: int,
) -> dict[str, float]:
    """Best seconds of each candidate execution of this layer on this input (:func:`_best_seconds`)."""
    train = needs_gradient(x, weights, bias)
    runs = {
        name: functools.partial(EXECUTE[name], x, weights, subs, stride, bias, kernel_size)
        for name in candidate_executions(x, subs, stride, kernel_size, train)
    }
    inputs = [t for t in (x, bias, *weights) if t is not None and t.requires_grad] if train else None
    return _best_seconds(runs, inputs, x.device)


def _best_seconds(
    runs: Mapping[str, Callable[[], Tensor]], inputs: Sequence[Tensor] | None, device: torch.device
) -> dict[str, float]:
    """Best seconds of each run (forward, or forward + backward into ``inputs`` when given),
    interleaved after one warm-up each. Gradients go to fresh tensors (no ``.grad`` is touched) from
    an all-ones output gradient (no random draw: timing must not move the global RNG, or a resumed
    run would draw other dropout masks than an uninterrupted one); CUDA is synchronised around each
    run (once per key, never in later calls)."""
    gy = None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(name: str) -> float:
        nonlocal gy
        sync()
        start = time.perf_counter()
        if inputs is not None:
            y = runs[name]()
            if gy is None:
                gy = torch.ones_like(y)
            torch.autograd.grad(y, inputs, gy)
        else:
            with torch.no_grad():
                runs[name]()
        sync()
        return time.perf_counter() - start

    best = {name: float("inf") for name in runs}
    for rep in range(1 + BENCHMARK_REPS):
        for name in runs:
            elapsed = run(name)
            if rep:
                best[name] = min(best[name], elapsed)
    return best


def pointwise_key(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int, int]) -> PlanKey:
    """What a 1x1x1 convolution's choice depends on: device, dtype, input shape and layout, gradients
    needed, weight shape, stride, bias."""
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last_3d) else "ncdhw"
    return (
        str(x.device),
        x.dtype,
        tuple(x.shape),
        layout,
        needs_gradient(x, (weight,), bias),
        tuple(weight.shape),
        tuple(stride),
        bias is not None,
    )


def choose_pointwise(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int, int], execute: Callable[[str], Tensor]
) -> str:
    """The execution of a 1x1x1 convolution (:class:`~cakes.ops.pointwise.PointwiseConv3d`), one of
    :data:`POINTWISE_EXECUTIONS`; ``execute(name)`` runs it. In ``benchmark`` mode the first call with
    a new :func:`pointwise_key` times each that can run (``packed`` in inference on channels-last
    float32 CPU inputs: :func:`cakes.ops.cpu.packed.applies`) and caches the choice (``conv3d``, what
    ``nn.Conv3d`` runs, is kept unless another is :data:`SWITCH_MARGIN` faster); every other mode,
    and deterministic algorithms, run ``gemm``."""
    if _State.mode != "benchmark" or torch.are_deterministic_algorithms_enabled():
        return "gemm"
    key = pointwise_key(x, weight, bias, stride)
    found = _State.pointwise_cache.get(key)
    if found is None:
        train = key[4]
        inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad] if train else None
        runs = {
            name: functools.partial(execute, name)
            for name in POINTWISE_EXECUTIONS
            if name != "packed" or packed.applies(x, train)
        }
        times = _best_seconds(runs, inputs, x.device)
        _State.pointwise_timings[key] = times
        found = _State.pointwise_cache[key] = pick(times, keep="conv3d")
    return found
