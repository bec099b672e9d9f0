"""Whole networks against their all-3D baseline: training step and inference wall time vs MACs.

Two tracks, each architecture paired with its all-3D baseline:

* ``video``: ResNet-50 I3D (SSV1 head, 174 classes) — C2D, P3D and the six published CAKES
  architectures (``archs/ssv1_*.yaml``) against C3D, clips of 8×112² and 8×224², batch 1 and 2;
* ``volume``: C2FNAS (light head, 3 classes) — all-2D (3x3x1), uniform v123d and a found
  architecture (``--found``) against all-3D, patches of 64³ and 96³, batch 1.

Every (architecture, shape) pair runs in its own process (fresh oneDNN caches, nothing left over
from other networks): the networks are built, warmed up (``--warmup`` rounds; the first also
settles the execution plan of every 3D convolution, see ``cakes.ops.plan``) and then timed
INTERLEAVED (baseline, arch, native baseline, baseline, arch, …); medians are reported::

    time ratio = arch ms / baseline ms       MAC ratio = arch MACs / baseline MACs (closed form)

Two baselines: the all-3D network run like every other (its convolutions get the executions the
plan picks, exactly as the architecture's do: the fair comparison of architectures), and the same
network NATIVE, i.e. its convolutions run as plain ``F.conv3d`` calls (``plan.using("grouped")``),
which is what an ``nn.Conv3d`` C3D costs in PyTorch. Both ratios are reported.

What the slot convolutions can change at all: the worker also times the baseline with every slot
convolution replaced by a zero-MAC strided view (norms, 1x1x1 convolutions, stem, head and the
backward of all of them kept), ``T_rest``. With ``T_base`` and the closed-form MACs ``M`` of the
slot convolutions alone (network MACs minus those of the slot-free network)::

    slot ÷ MAC  = ((T_arch - T_rest) / (T_base - T_rest)) / (M_arch / M_base)
    bound ÷ MAC = (T_rest + (T_base - T_rest) · M_arch / M_base) / T_base / MAC ratio

``slot ÷ MAC`` is how the architecture's convolutions run per MAC against the baseline's (1.0: as
efficiently); ``bound ÷ MAC`` is the whole-network time ÷ MAC an architecture would reach if its
convolutions ran exactly as efficiently per MAC as the baseline's — above 1 whenever the rest of the
network takes a larger share of the time than of the MACs.

A second table gives the same as rates, against the targets of :data:`TARGETS` (time ÷ MAC ≤ 1.15 in
training, ≤ 1.10 in inference): the slot convolutions' GMAC/s in the baseline and in the
architecture, and the GMAC/s the architecture's slot convolutions would need for the whole network
to meet its target with the rest of the network as timed (``unreachable``: the rest alone takes
longer than the target allows)::

    slot GMAC/s   = M_slots · passes / (T - T_rest)       passes: 3 in training (forward, input and
                                                            weight gradients), 1 in inference
    needed GMAC/s = M_arch slots · passes / (target · MAC ratio · T_base - T_rest)

The header also gives the rate of a reference float32 GEMM (2048², :func:`reference_gemm_rate`) at
the start and the end of the run: a dense rate of the machine to hold the needed rates against (a
reference, not a ceiling), and its drift during the run.

A training step is forward + cross-entropy + backward (gradients set to None between steps, no
optimizer); inference is ``eval()`` under ``no_grad``, with every network's batch norms folded into
the convolutions before them (``cakes.ops.fold_batch_norms``; ``--no-fold`` keeps them).
``time ÷ MAC`` is 1.0 when an architecture
turns its MAC savings fully into time savings. ``--one-process`` instead builds every network of
the track in ONE process and interleaves them all (the "many models in one process" case); after
each interleaved round it also runs every network twice in a row and times the second step, so the
table it appends — interleaved ÷ back-to-back per network — is the cost of sharing the process,
measured in the same minutes (free of the machine's drift between separate runs).

    python benchmarks/network.py --track video --shapes 8x112:1 --reps 5 --out benchmarks/results
    python benchmarks/network.py --track volume --shapes 64:1 96:1 --reps 3
    python benchmarks/network.py --only ssv1_cakes23d_c --modes eval --onnx
    python benchmarks/network.py --device cuda          # timed with CUDA events
    python benchmarks/network.py --fast-path off        # the CPU fast paths off (A/B: run both)

``--fast-path on|off`` switches the CPU fast paths (``cakes.ops.set_fast_path``) in every process;
off, ``CakesConv3d``'s ``fused`` execution is the reference per-group form and the 1x1x1
convolutions run as plain ``F.conv3d`` instead of one GEMM (``cakes.ops.pointwise``). For an A/B of the fast
path, run the same command with ``on`` and ``off`` (``CAKES_CONV_PLAN=fused`` pins the execution
plan so both runs time the fused op).

Writes ``<out>/network_<track>.md`` (table, settings: processor, ISA, commit, machine load) and ``network_<track>.png``
(time ratio against MAC ratio, one point per architecture and shape, the diagonal "time = MACs" and
the target lines), and ``network_<track>.json`` (every timing) when ``--out`` is given.
``--replot <json>`` redraws a saved run's PNG from its JSON without timing anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cakes.ops.arch import Arch, load_arch  # noqa: E402
from cakes.backbones import C2FNAS, ResNet3d  # noqa: E402
from cakes.ops import (  # noqa: E402
    Derived,
    Homogeneous,
    OperatorFactory,
    Uniform,
    fast_path,
    fast_path_enabled,
    fold_batch_norms,
    plan,
    set_fast_path,
)
from cakes.ops.factory import ConvNorm  # noqa: E402
from cakes.ops.subkernel import as_triple  # noqa: E402
from cakes.profile import profile  # noqa: E402
from cakes.files import write_atomic  # noqa: E402
from cakes.figures import save_figure  # noqa: E402
from cakes.utils import machine_text  # noqa: E402

CL = torch.channels_last_3d
#: suffix of the baseline timed with plain ``F.conv3d`` convolutions (``plan.using("grouped")``)
NATIVE = " (native)"
#: suffix of the baseline with every slot convolution replaced by a zero-MAC strided view
SLOT_FREE = " (no slot convs)"


class _Subsample(torch.autograd.Function):
    """``x[:, :, ::s_T, ::s_H, ::s_W]`` in ``x``'s memory layout, whose gradient has that layout too.
    Slicing's own backward returns an NCDHW gradient: on a channels-last network it sent every layer
    before a strided slot through mixed-layout ReLU and batch-norm backward kernels (up to 10× slower
    than on one layout), which no real slot convolution does (their input gradients are channels-last)
    and which added ~2 % to ResNet-50 I3D's slot-free training step (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.stride = x.shape, stride
        ctx.layout = CL if x.is_contiguous(memory_format=CL) else torch.contiguous_format
        st, sh, sw = stride
        return x[:, :, ::st, ::sh, ::sw].contiguous(memory_format=ctx.layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        st, sh, sw = ctx.stride
        grad_input = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout).zero_()
        grad_input[:, :, ::st, ::sh, ::sw] = grad
        return grad_input, None


class StridedView(nn.Module):
    """Zero-MAC stand-in for a slot convolution (``in_channels == out_channels``): the input, subsampled
    by the stride, in its own layout forward and backward. ``(N, C, T, H, W) -> (N, C, T', H', W')``."""

    def __init__(self, channels: int, stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.out_channels, self.stride = channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stride == (1, 1, 1) else _Subsample.apply(x, self.stride)


class SlotFree(OperatorFactory):
    """Every slot: :class:`StridedView` then the slot's norm (what a network costs without slot convs)."""

    def __call__(self, *, layer: str, in_channels: int, out_channels: int, norm, stride=1) -> nn.Module:
        if in_channels != out_channels:
            raise ValueError(
                f"slot {layer}: a strided view needs in == out channels, got {in_channels} -> {out_channels}"
            )
        return ConvNorm(StridedView(out_channels, as_triple(stride)), norm(out_channels))


PUBLISHED = [f"ssv1_cakes{s}_{m}" for s in ("12d", "23d", "123d") for m in ("c", "p")]
#: the whole-network targets, time ratio ÷ MAC ratio at most this per mode (issue #12)
TARGETS = {"train": 1.15, "eval": 1.10}
#: MAC passes over the slot convolutions per mode: forward, input gradient, weight gradient
MAC_PASSES = {"train": 3, "eval": 1}
RATES_HEADING = "Slot convolutions, GMAC/s (baseline, architecture, needed for the target):"
SHARING_HEADING = "Sharing one process: each network's step interleaved with the others ÷ back to back:"


@dataclass(frozen=True)
class Track:
    baseline: str
    networks: tuple[str, ...]
    shapes: tuple[str, ...]  # default shapes, "TxS:B" (video) or "S:B" (volume)
    title: str  # the backbone, as the figure names it


TRACKS = {
    "video": Track("C3D", ("C2D", "P3D", *PUBLISHED), ("8x112:1", "8x112:2", "8x224:1", "8x224:2"), "ResNet-50 I3D"),
    "volume": Track("C2FNAS 3D", ("C2FNAS 2D", "uniform v123d", "found"), ("64:1", "96:1"), "C2FNAS"),
}


def fit_arch(arch: Arch, slots: Mapping[str, int]) -> Arch:
    """``arch`` with every layer's counts scaled to the slot widths of ``slots`` (largest remainder,
    listed order on ties), so the published full-width mixes also run at toy widths and a width-1/8
    search export runs at full width (×8: exact)."""
    layers = {}
    for name, width in slots.items():
        counts = arch.layers[name]
        total = sum(counts.values())
        exact = {k: n * width / total for k, n in counts.items()}
        fitted = {k: int(v) for k, v in exact.items()}
        for k in sorted(exact, key=lambda k: fitted[k] - exact[k])[: width - sum(fitted.values())]:
            fitted[k] += 1
        layers[name] = fitted
    return Arch(arch.backbone, arch.op_set, layers, {**arch.meta, "fitted_to_width": True})


def operator(track: str, name: str, width: float, found: Path | None) -> OperatorFactory:
    """The operator factory of network ``name`` of ``track``."""
    if track == "video":
        homogeneous = {"C2D": "c2d", "P3D": "p3d", "C3D": "c3d"}
        if name in homogeneous:
            return Homogeneous(homogeneous[name])
        return Derived(fit_arch(load_arch(ROOT / "archs" / f"{name}.yaml"), ResNet3d.slots(depth=50, width=width)))
    homogeneous = {"C2FNAS 3D": "c3d", "C2FNAS 2D": "vol2d"}
    if name in homogeneous:
        return Homogeneous(homogeneous[name])
    if name == "uniform v123d":
        return Uniform("v123d")
    if name == "found":
        if found is None:
            raise ValueError("the volume network 'found' needs --found <c2fnas arch yaml> (a search export)")
        return Derived(fit_arch(load_arch(found), C2FNAS.slots(width=width)))
    raise ValueError(f"unknown {track} network {name!r}; known: {[TRACKS[track].baseline, *TRACKS[track].networks]}")


def build(track: str, name: str, width: float, found: Path | None) -> nn.Module:
    op = SlotFree() if name.endswith(SLOT_FREE) else operator(track, name.removesuffix(NATIVE), width, found)
    if track == "video":
        return ResNet3d(operator=op, depth=50, width=width, num_classes=174)
    return C2FNAS(operator=op, width=width, num_classes=3)


def parse_shape(track: str, spec: str) -> tuple[int, ...]:
    """``"8x112:2"`` -> ``(2, 3, 8, 112, 112)`` (video); ``"96:1"`` -> ``(1, 1, 96, 96, 96)`` (volume)."""
    try:
        size, batch = spec.split(":")
        if track == "video":
            frames, side = (int(v) for v in size.split("x"))
            return (int(batch), 3, frames, side, side)
        return (int(batch), 1, int(size), int(size), int(size))
    except ValueError:
        example = "8x112:2 (frames x side : batch)" if track == "video" else "96:1 (side : batch)"
        raise SystemExit(f"--shapes: cannot read {spec!r} for the {track} track; expected e.g. {example}") from None


def macs(track: str, name: str, width: float, found: Path | None, shape: tuple[int, ...]) -> int:
    """Closed-form MACs of one sample (built on the meta device)."""
    with torch.device("meta"):
        net = build(track, name, width, found)
    return profile(net, (1, *shape[1:])).macs


# --------------------------------------------------------------------------------------------------
# timing (one process)
# --------------------------------------------------------------------------------------------------


class Timer:
    """Wall time of a callable: ``perf_counter`` on CPU, CUDA events (no other sync) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def reference_gemm_rate(device: torch.device, size: int = 2048, reps: int = 7) -> float:
    """GMAC/s of a ``size``² float32 GEMM on ``device`` (median of ``reps`` after two warm-ups): a
    reference dense rate of the machine, not a ceiling (dense 3x3x3 convolutions have run above it)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    timer = Timer(device)
    seconds = [timer(lambda: a @ b) for _ in range(2 + reps)][2:]
    return size**3 / statistics.median(seconds) / 1e9


def step_fn(
    net: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str, native: bool = False
) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward; grads reset) or one inference; ``native``:
    every convolution as a plain ``F.conv3d`` call (the plan pinned to ``grouped``, the 1x1x1
    convolutions' GEMM off with the fast path), i.e. what the network costs built of ``nn.Conv3d``."""
    params = [p for p in net.parameters() if p.requires_grad]

    def train() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(net(x), target).backward()

    def infer() -> None:
        with torch.no_grad():
            net(x)

    step = train if mode == "train" else infer
    if not native:
        return step

    def pinned() -> None:
        with plan.using("grouped"), fast_path(False):
            step()

    return pinned


def inference_copy(net: nn.Module, fold: bool) -> nn.Module:
    """``net`` in eval mode, with its batch norms folded into the convolutions before them
    (:func:`cakes.ops.fold_batch_norms`, a copy) unless ``fold`` is false. In the slot-free network
    a slot's norm has no convolution to fold into; the folded baseline's slot has no norm left, so
    the slot-free counterpart drops it."""
    net = net.eval()
    if not fold:
        return net
    folded = copy.deepcopy(net)
    for module in folded.modules():
        if isinstance(module, ConvNorm) and isinstance(module.conv, StridedView):
            module.norm = nn.Identity()
    return fold_batch_norms(folded, inplace=True)


def targets(track: str, net_out_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if track == "video":
        return torch.randint(0, net_out_shape[1], net_out_shape[:1], generator=gen).to(device)
    return torch.randint(0, net_out_shape[1], (net_out_shape[0], *net_out_shape[2:]), generator=gen).to(device)


def time_interleaved(
    track: str, names: list[str], shape: tuple[int, ...], args: argparse.Namespace, back_to_back: bool = False
) -> dict[str, Any]:
    """``{mode: {network: [seconds per rep]}, "plan": plan_record()}``, every network of ``names`` built
    here and timed round-robin after ``args.warmup`` untimed rounds.

    ``back_to_back`` (the one-process run): each round is followed by one in which every network runs
    twice in a row and its second step is timed (``result["back_to_back"][mode][network]``): the same
    network, process and minutes, but with its caches hot from its own step instead of another
    network's — what it costs when it is the only network stepping. Both are measured in the same
    minutes, so drift of the machine between runs does not enter their ratio."""
    device = torch.device(args.device)
    fmt = CL if args.layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    nets = {name: build(track, name, args.width, args.found).to(device, memory_format=fmt) for name in names}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device).contiguous(memory_format=fmt)
    timer = Timer(device)
    result: dict[str, Any] = {}
    for mode in args.modes:
        if mode == "train":
            timed = {name: net.train() for name, net in nets.items()}
        else:
            timed = {name: inference_copy(net, args.fold) for name, net in nets.items()}
        with torch.no_grad():
            out_shape = tuple(timed[names[0]](x[:1]).shape)
        target = targets(track, (shape[0], *out_shape[1:]), device)
        steps = {name: step_fn(net, x, target, mode, name.endswith(NATIVE)) for name, net in timed.items()}
        for _ in range(args.warmup):
            for step in steps.values():
                timer(step)
        times: dict[str, list[float]] = {name: [] for name in names}
        alone: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.reps):
            for name, step in steps.items():
                times[name].append(timer(step))
            if back_to_back:
                for name, step in steps.items():
                    timer(step)  # after the other networks' steps: re-warms this one
                    alone[name].append(timer(step))
        result[mode] = times
        if back_to_back:
            result.setdefault("back_to_back", {})[mode] = alone
        if mode == "eval" and args.onnx:
            result["onnx"] = time_onnx({n: net for n, net in timed.items() if not n.endswith(NATIVE)}, x, args)
    result["plan"] = plan_record()
    return result


def plan_record() -> dict[str, list]:
    """The execution plan this process settled on: per layer key (input shape, groups, gradients) and
    per 1x1x1 key (input shape, weight shape, stride, gradients), the execution chosen and the best
    ms of every candidate measured."""
    timings, pointwise = plan.timings(), plan.pointwise_timings()

    def ms(times: Mapping[str, float]) -> dict[str, float]:
        return {e: round(t * 1e3, 2) for e, t in times.items()}

    return {
        "layers": [
            [list(key[2]), [list(g) for g in key[6]], key[4], choice, ms(timings[key])]
            for key, choice in plan.choices().items()
            if key in timings
        ],
        "pointwise": [
            [list(key[2]), list(key[5]), list(key[6]), key[4], choice, ms(pointwise[key])]
            for key, choice in plan.pointwise_choices().items()
        ],
    }


def time_onnx(nets: Mapping[str, nn.Module], x: torch.Tensor, args: argparse.Namespace) -> dict[str, list[float]]:
    """onnxruntime (CPU provider, ``args`` threads) inference of each network exported by
    :func:`cakes.export.export_onnx`, interleaved; seconds per rep."""
    import onnxruntime as ort

    from cakes.export import export_onnx

    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, net) in enumerate(nets.items()):
            path = export_onnx(net.eval().cpu(), tuple(x.shape), Path(tmp) / f"net{i}.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = x.detach().cpu().contiguous().numpy()
    steps = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}
    timer = Timer(torch.device("cpu"))
    for _ in range(args.warmup):
        for step in steps.values():
            timer(step)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(timer(step))
    return times


# --------------------------------------------------------------------------------------------------
# runs, tables, plot
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One architecture at one shape: medians (ms) of it and of its baseline per mode."""

    track: str
    shape: str
    arch: str
    mac_ratio: float
    #: MACs of the slot convolutions alone, arch / baseline (nan when not measured)
    slot_mac_ratio: float = float("nan")
    #: mode -> seconds (baseline, arch, native baseline, baseline without slot convs); nan: not timed
    ms: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    #: forward GMACs of the baseline's slot convolutions over the whole batch (nan when not measured)
    base_slot_gmac: float = float("nan")

    def ratio(self, mode: str) -> float:
        base, arch, _, _ = self.ms[mode]
        return arch / base

    def native_ratio(self, mode: str) -> float:
        """Time ratio against the native (plain ``F.conv3d``) baseline."""
        _, arch, native, _ = self.ms[mode]
        return arch / native

    def slot_per_mac(self, mode: str) -> float:
        """Slot convolutions' time ratio ÷ their MAC ratio (module docstring)."""
        base, arch, _, rest = self.ms[mode]
        return (arch - rest) / (base - rest) / self.slot_mac_ratio

    def bound_per_mac(self, mode: str) -> float:
        """Whole-network time ÷ MAC with slot convolutions exactly as efficient as the baseline's."""
        base, _, _, rest = self.ms[mode]
        return (rest + (base - rest) * self.slot_mac_ratio) / base / self.mac_ratio

    def slot_rates(self, mode: str) -> tuple[float, float, float]:
        """GMAC/s of the slot convolutions in ``mode`` (one of :data:`TARGETS`): the baseline's, the
        architecture's, and what the architecture's would need for the whole network to meet
        ``TARGETS[mode]`` with the rest as timed (``inf``: the rest alone exceeds the target; ``nan``
        where the rest was not timed, as in one-process runs)."""
        base, arch, _, rest = self.ms[mode]
        work = self.base_slot_gmac * MAC_PASSES[mode]
        arch_work = work * self.slot_mac_ratio
        budget = TARGETS[mode] * self.mac_ratio * base - rest
        needed = math.inf if budget <= 0 else arch_work / budget  # a nan budget (rest untimed) stays nan
        return work / (base - rest), arch_work / (arch - rest), needed


def run_pair(track: str, arch: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``arch`` with its baseline in a child process (``--worker``); returns its timings."""
    base = TRACKS[track].baseline
    names = [base, arch, base + NATIVE, base + SLOT_FREE]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps([track, names, spec]),
        *args.forward,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode:
        raise RuntimeError(f"benchmark worker for {arch} at {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_or_nan(times: Mapping[str, list[float]], name: str) -> float:
    """Median seconds of ``name``, ``nan`` when it was not timed (one-process runs, onnxruntime)."""
    return statistics.median(times[name]) if name in times else float("nan")


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def number(value: float, digits: int) -> str:
    """``value`` to ``digits`` places; ``–`` for ``nan`` (not timed: the native baseline in onnxruntime,
    one-process runs)."""
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def untimed_as_null(value: Any) -> Any:
    """``value`` with every ``nan`` (a cell that was not timed) replaced by ``None``, so the saved JSON
    is strict JSON (``null``; Python's ``NaN`` token is rejected by most other readers)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: untimed_as_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [untimed_as_null(v) for v in value]
    return value


def table(rows: list[Row], modes: list[str]) -> str:
    labels = {"train": "train", "eval": "inference", "onnx": "onnxruntime"}
    head = "| shape | arch | MAC ratio |"
    rule = "|---|---|---:|"
    for mode in modes:
        label = labels[mode]
        head += (
            f" {label} base ms | {label} native base ms | {label} rest ms | {label} ms | {label} ratio |"
            f" {label} ÷ MAC | {label} ratio vs native | ÷ MAC vs native | slot ÷ MAC | bound ÷ MAC |"
        )
        rule += "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = f"| {r.shape} | {r.arch} | {r.mac_ratio:.3f} |"
        for mode in modes:
            base, arch, native, rest = r.ms[mode]
            cells = [
                *(number(t * 1e3, 0) for t in (base, native, rest, arch)),
                number(r.ratio(mode), 3),
                number(r.ratio(mode) / r.mac_ratio, 2),
                number(r.native_ratio(mode), 3),
                number(r.native_ratio(mode) / r.mac_ratio, 2),
                number(r.slot_per_mac(mode), 2),
                number(r.bound_per_mac(mode), 2),
            ]
            line += "".join(f" {c} |" for c in cells)
        lines.append(line)
    return "\n".join(lines)


def rates_table(rows: list[Row], modes: list[str]) -> str:
    """Markdown: per row and targeted mode, :meth:`Row.slot_rates` (GMAC/s)."""
    targeted = [m for m in modes if m in TARGETS]
    head = "| shape | arch |" + "".join(
        f" {m} baseline slots | {m} arch slots | {m} needed for ≤ {TARGETS[m]:.2f} × MAC |" for m in targeted
    )
    lines = [head, "|---|---|" + "---:|" * (3 * len(targeted))]
    for r in rows:
        cells = ["unreachable" if math.isinf(rate) else number(rate, 0) for m in targeted for rate in r.slot_rates(m)]
        lines.append(f"| {r.shape} | {r.arch} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def sharing_table(one_process: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown from :func:`time_interleaved`'s ``back_to_back`` result per shape: per network, the
    median step interleaved with the other networks, the median step run back to back with itself
    (same process, same minutes) and the median over rounds of their ratio (each round's interleaved
    step over the back-to-back step that followed it), per mode."""
    modes = list(next(iter(one_process.values()))["back_to_back"])
    head = "| shape | network | " + " | ".join(
        f"{m} interleaved ms | {m} back-to-back ms | {m} ratio (median per round)" for m in modes
    )
    lines = [head + " |", "|---|---|" + "---:|" * (3 * len(modes))]
    for spec, times in one_process.items():
        for name in times[modes[0]]:
            cells = []
            for m in modes:
                mixed, alone = times[m][name], times["back_to_back"][m][name]
                ratio = statistics.median(a / b for a, b in zip(mixed, alone, strict=True))
                cells += [
                    f"{statistics.median(mixed) * 1e3:.0f}",
                    f"{statistics.median(alone) * 1e3:.0f}",
                    f"{ratio:.3f}",
                ]
            lines.append(f"| {spec} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], modes: list[str], path: Path, title: str) -> None:
    """Time ratio against MAC ratio, one panel per mode, one point per architecture and shape (filled:
    against the baseline run like the architecture; hollow: against the native baseline; ``x``: the
    bound with slot convolutions as efficient per MAC as the baseline's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"train": "training step", "eval": "inference", "onnx": "onnxruntime inference"}
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 5), squeeze=False)
    shapes = sorted({r.shape for r in rows})
    markers = dict(zip(shapes, "os^Dv<>p", strict=False))
    top = max([1.1] + [r.ratio(m) * 1.05 for r in rows for m in modes] + [r.mac_ratio * 1.05 for r in rows])
    for ax, mode in zip(axes[0], modes, strict=True):
        ax.plot([0, top], [0, top], "k--", lw=1, label="time = MACs")
        if mode in TARGETS:
            target = TARGETS[mode]
            ax.plot([0, top], [0, target * top], color="tab:red", lw=0.8, ls="-.", label=f"target: {target:.2f} × MACs")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="baseline time")
        for r in rows:
            dot = ax.scatter(r.mac_ratio, r.ratio(mode), marker=markers[r.shape], s=36)
            ax.scatter(
                r.mac_ratio,
                r.native_ratio(mode),
                marker=markers[r.shape],
                s=36,
                facecolors="none",
                edgecolors=dot.get_facecolor(),
            )
            ax.scatter(r.mac_ratio, r.bound_per_mac(mode) * r.mac_ratio, marker="x", s=24, color=dot.get_facecolor())
            ax.annotate(
                r.arch.replace("ssv1_cakes", ""),
                (r.mac_ratio, r.ratio(mode)),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        for s in shapes:
            ax.scatter([], [], marker=markers[s], color="grey", label=f"{s} vs baseline")
            ax.scatter([], [], marker=markers[s], facecolors="none", edgecolors="grey", label=f"{s} vs native baseline")
        ax.scatter([], [], marker="x", color="grey", label="bound: slot convs as efficient as the baseline's")
        ax.set(
            xlim=(0, top),
            ylim=(0, top),
            xlabel="MAC ratio (arch / all-3D)",
            ylabel="time ratio (arch / all-3D)",
            title=f"{title}: {labels[mode]}",
        )
        ax.legend(fontsize=7, loc="lower right")  # the emptiest corner in every saved run
    save_figure(fig, path, dpi=110)


def apply_process_settings(args: argparse.Namespace) -> None:
    """This process's threads and CPU fast path, as the command line asks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fast_path is not None:
        set_fast_path(args.fast_path == "on")  # also sets CAKES_FAST_PATH, which the workers inherit


def replot(saved: Path) -> Path:
    """Redraw the PNG of a saved run from its JSON (``--out``'s ``network_<track>.json``), next to it,
    without timing anything; returns the PNG's path."""
    try:
        rows = [
            Row(**{**r, "ms": {m: tuple(math.nan if t is None else t for t in ts) for m, ts in r["ms"].items()}})
            for r in json.loads(saved.read_text())["rows"]
        ]
        known = all(r.track in TRACKS for r in rows)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"--replot: cannot read {saved} as a network_<track>.json of this script: {error!r}") from None
    if not known:
        raise SystemExit(f"--replot: {saved} names a track other than {list(TRACKS)}")
    if not rows:
        raise SystemExit(f"--replot: {saved} holds no rows")
    path = saved.with_suffix(".png")
    plot(rows, list(rows[0].ms), path, TRACKS[rows[0].track].title)
    return path


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", choices=list(TRACKS), default="video")
    parser.add_argument("--only", nargs="+", metavar="NET", help="architectures to run (default: all of the track)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help="video 'TxS:B' (8x112:1), volume 'S:B' (96:1); default: the track's shapes",
    )
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    parser.add_argument("--reps", type=int, default=5, help="timed interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (CUDA timed with events)")
    parser.add_argument("--layout", choices=["channels_last", "ncdhw"], default="channels_last")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (toy sizes for tests)")
    parser.add_argument(
        "--found",
        type=Path,
        default=None,
        help="c2fnas arch yaml of the volume track's 'found' network, fitted to the benchmark width "
        "(a width-1/8 demo export runs ×8 at full width); without it 'found' is left out",
    )
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime inference of exported networks")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="all networks of the track in this one process, interleaved (no pairing)",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for the markdown table, PNG and JSON")
    parser.add_argument(
        "--fast-path",
        choices=["on", "off"],
        default=None,
        help="switch the CPU fast paths: CakesConv3d's and the 1x1x1 GEMM (default: CAKES_FAST_PATH, else on)",
    )
    parser.add_argument(
        "--no-fold",
        dest="fold",
        action="store_false",
        help="time inference with the batch norms as modules (default: folded into the convolutions, "
        "cakes.ops.fold_batch_norms, in every network)",
    )
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="redraw the PNG of a saved run from its JSON (times nothing)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replot:
        print(replot(args.replot))
        return []
    if args.onnx and "eval" not in args.modes:
        parser.error("--onnx times inference: keep 'eval' in --modes")
    apply_process_settings(args)
    if args.worker:  # child process of run_pair: time one pair, print the JSON
        track, names, spec = json.loads(args.worker)
        print(json.dumps(time_interleaved(track, names, parse_shape(track, spec), args)))
        return []
    # the settings a worker needs, as command-line flags
    args.forward = [
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--layout",
        args.layout,
        "--width",
        str(args.width),
        *(["--found", str(args.found)] if args.found else []),
        "--modes",
        *args.modes,
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--onnx"] if args.onnx else []),
        *([] if args.fold else ["--no-fold"]),
    ]
    track = TRACKS[args.track]
    archs = args.only or [n for n in track.networks if n != "found" or args.found]
    if "found" in archs and args.track == "volume" and args.found is None:
        parser.error("--only found: give the architecture with --found <c2fnas arch yaml>")
    unknown = [a for a in archs if a not in track.networks]
    if unknown:
        parser.error(f"--only: {unknown} are not {args.track} networks; known: {list(track.networks)}")
    specs = args.shapes or list(track.shapes)
    modes = [*args.modes, *(["onnx"] if args.onnx else [])]
    started = load_text()
    machine = machine_text()  # once: it runs git
    fast = "on" if fast_path_enabled() else "off"
    print(
        f"{machine}; {args.device}, {args.layout}, width {args.width}, CPU fast path {fast}, "
        f"batch norms {'folded' if args.fold else 'kept'} in inference; "
        f"{args.warmup} warm-up + {args.reps} interleaved reps, medians; load average {started}",
        flush=True,
    )
    reference = [reference_gemm_rate(torch.device(args.device))]
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    one_process: dict[str, dict[str, Any]] = {}  # shape -> the one process's timings
    for spec in specs:
        shape = parse_shape(args.track, spec)
        base_macs = macs(args.track, track.baseline, args.width, args.found, shape)
        rest_macs = macs(args.track, track.baseline + SLOT_FREE, args.width, args.found, shape)
        if args.one_process:
            times = one_process[spec] = time_interleaved(
                args.track, [track.baseline, *archs], shape, args, back_to_back=True
            )
        for arch in archs:
            pair = times if args.one_process else run_pair(args.track, arch, spec, args)
            raw[f"{spec} {arch}"] = pair
            arch_macs = macs(args.track, arch, args.width, args.found, shape)
            ratio = arch_macs / base_macs
            slot_ratio = (arch_macs - rest_macs) / (base_macs - rest_macs)

            timed = (track.baseline, arch, track.baseline + NATIVE, track.baseline + SLOT_FREE)
            medians = {m: tuple(median_or_nan(pair[m], n) for n in timed) for m in modes}
            row = Row(args.track, spec, arch, ratio, slot_ratio, medians, (base_macs - rest_macs) * shape[0] / 1e9)
            rows.append(row)
            print(table([row], modes).splitlines()[-1], flush=True)
    reference.append(reference_gemm_rate(torch.device(args.device)))
    settings = (
        f"{args.track}, {'one process for all networks' if args.one_process else 'one process per pair'}; "
        f"{machine}; {args.device}, {args.layout}, width {args.width}, "
        f"CPU fast path {fast}, batch norms {'folded' if args.fold else 'kept'} in inference, "
        f"{args.warmup} warm-up + {args.reps} interleaved reps, medians; load average at start {started}, "
        f"at end {load_text()}; reference float32 GEMM 2048²: {reference[0]:.0f} GMAC/s at start, "
        f"{reference[1]:.0f} at end"
    )
    text = f"{settings}\n\n{table(rows, modes)}\n\n{RATES_HEADING}\n\n{rates_table(rows, modes)}\n"
    if one_process:
        text += f"\n{SHARING_HEADING}\n\n{sharing_table(one_process)}\n"
    print(f"\n{text}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / f"network_{args.track}.md", text)
        write_atomic(
            args.out / f"network_{args.track}.json",
            json.dumps(
                untimed_as_null(
                    {
                        "settings": settings,
                        "reference_gemm_gmacs": reference,
                        "rows": [asdict(r) for r in rows],
                        "times": raw,
                    }
                ),
                indent=1,
                allow_nan=False,
            ),
        )
        plot(rows, modes, args.out / f"network_{args.track}.png", track.title)
    return rows


if __name__ == "__main__":
    main()
