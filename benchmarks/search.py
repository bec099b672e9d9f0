"""Cost of a search step on CPU: supernet slots against what they should cost.

* performance-priority: a training step (forward + backward) of a ``PerformancePrioritySlot``
  (sampling, sliced weights, sliced BN with statistics written back) against the step of the
  derived slot of equal width (``CakesConv3d`` + BN with the same per-op counts) — target ≤ 1.2×;
  and the same for a whole tiny ResNet (supernet vs the derived network of equal width).
* cost-priority: a step of a ``CostPrioritySlot`` (all candidates + one BN over n·C_out) against
  the sum of its branches run separately (each sub-kernel conv with C_out outputs + its BN)
  — target ≤ 1.1×.

Runs are interleaved after a warm-up; medians are reported (robust on a busy machine).

    python benchmarks/search.py [--reps 15] [--channels 128] [--frames 8] [--size 28] [--batch 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cakes.backbones import ResNet3d  # noqa: E402
from cakes.ops import CakesConv3d, ConvNorm, CostPriority, Derived, PerformancePriority  # noqa: E402
from cakes.ops.factory import uniform_counts  # noqa: E402
from cakes.ops.subkernel import resolve_op_set  # noqa: E402

CL = torch.channels_last_3d


def step_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step's compute: forward + backward (input requires grad, as inside a net)."""
    def step() -> None:
        inp = x.detach().requires_grad_(True)
        out = module(inp)
        out.backward(torch.ones_like(out))
        module.zero_grad(set_to_none=True)
    return step


def interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def slot_benchmarks(args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    c, x = args.channels, torch.randn(args.batch, args.channels, args.frames, args.size, args.size)
    x = x.contiguous(memory_format=CL)
    rows = []
    for op_set in args.op_sets:
        ops = resolve_op_set(op_set)
        # performance-priority vs derived of equal width (the expected per-op counts of per_channel sampling)
        perf = PerformancePriority(op_set, sampling="per_channel")(layer="s", in_channels=c, out_channels=c,
                                                                     norm=nn.BatchNorm3d).train()
        derived = ConvNorm(CakesConv3d(c, uniform_counts(ops, c)), nn.BatchNorm3d(c)).train()
        for m in (perf, derived):
            m.to(memory_format=CL)
        t = interleaved({"perf": step_fn(perf, x), "derived": step_fn(derived, x)}, args.reps)
        rows.append((f"perf-priority slot {op_set} vs derived", t["perf"], t["derived"], 1.2))
        # cost-priority vs the sum of its branches
        cost = CostPriority(op_set)(layer="s", in_channels=c, out_channels=c, norm=nn.BatchNorm3d).train()
        branches = {name: ConvNorm(CakesConv3d(c, {name: c}), nn.BatchNorm3d(c)).train() for name in ops.names}
        for m in (cost, *branches.values()):
            m.to(memory_format=CL)
        fns = {"cost": step_fn(cost, x), **{n: step_fn(b, x) for n, b in branches.items()}}
        t = interleaved(fns, args.reps)
        rows.append((f"cost-priority slot {op_set} vs sum of branches", t["cost"],
                     sum(t[n] for n in ops.names), 1.1))
    return rows


def network_benchmark(args: argparse.Namespace) -> tuple[str, float, float, float]:
    """Whole tiny ResNet (depth 50, width 0.125): performance-priority supernet vs derived network."""
    torch.manual_seed(0)
    x = torch.randn(args.batch * 4, 3, args.frames, 56, 56).contiguous(memory_format=CL)
    supernet = ResNet3d(operator=PerformancePriority("c123d"), depth=50, width=0.125, num_classes=8)
    slots = ResNet3d.slots(depth=50, width=0.125)
    arch = {"backbone": "resnet3d", "op_set": "c123d",
            "layers": {n: uniform_counts(resolve_op_set("c123d"), w) for n, w in slots.items()}}
    derived = ResNet3d(operator=Derived(arch), depth=50, width=0.125, num_classes=8)
    for m in (supernet, derived):
        m.train().to(memory_format=CL)
    t = interleaved({"perf": step_fn(supernet, x), "derived": step_fn(derived, x)}, args.reps)
    return ("perf-priority tiny ResNet-50 vs derived", t["perf"], t["derived"], 1.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--op-sets", nargs="+", default=["c12d", "c23d", "c123d"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; slot input "
          f"({args.batch}, {args.channels}, {args.frames}, {args.size}, {args.size}), channels-last; "
          f"median of {args.reps} interleaved fwd+bwd steps\n")
    rows = [*slot_benchmarks(args), network_benchmark(args)]
    print("| case | supernet ms | reference ms | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, mine, ref, target in rows:
        print(f"| {name} | {mine * 1e3:.1f} | {ref * 1e3:.1f} | {mine / ref:.2f} | ≤ {target} |")


if __name__ == "__main__":
    main()
