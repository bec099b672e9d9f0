"""Cost of a search step on CPU: supernet slots against what they should cost.

* performance-priority: a training step (forward + backward) of a ``PerformancePrioritySlot``
  (sampling, sliced weights, sliced BN with statistics written back) against the step of the
  derived slot of the sub-network it sampled (``CakesConv3d`` + BN with the same per-op counts)
  — target ≤ 1.2×; and the same for a whole tiny ResNet. Paired: every timed supernet step uses
  one draw of the real sampler and is timed beside the derived network of exactly that draw, so
  the ratio is the supernet machinery (gathers, sliced BN, channel scatter), not luck in the
  counts. Also shown: against the derived network with uniform counts (e.g. 64/64, which oneDNN's
  16-channel blocks favour; random draws are rarely multiples of 16).
* cost-priority: a step of a ``CostPrioritySlot`` (all candidates + one BN over n·C_out) against
  its branches run separately on the same input (each sub-kernel conv with C_out outputs + its
  own BN; autograd sums their input gradients) — target ≤ 1.1×.

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
from cakes.ops import CakesConv3d, ConvNorm, CostPriority, Derived, PerformancePriority, search_slots  # noqa: E402
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


def branches_step(branches: list[nn.Module], x: torch.Tensor) -> Callable[[], None]:
    """The branches of a cost-priority slot run separately on one input: each its own step, and
    autograd sums their input gradients (which the slot does too). No concatenation: a 5-D
    channels-last ``torch.cat`` alone would make this reference ~1.7x slower."""

    def step() -> None:
        inp = x.detach().requires_grad_(True)
        outs = [branch(inp) for branch in branches]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for branch in branches:
            branch.zero_grad(set_to_none=True)

    return step


def paired(
    supernet: nn.Module, build_derived: Callable[[list[dict[str, int]]], nn.Module], x: torch.Tensor, reps: int
) -> tuple[float, float]:
    """Median seconds of supernet steps and of the derived networks of the same draws.

    ``reps`` draws of the supernet's own sampler are taken up front (recorded per slot, in call
    order); ``build_derived(counts per slot)`` builds the derived network of each. One untimed
    round warms oneDNN's primitive cache for every shape, then the pairs run interleaved.
    """
    sampler = search_slots(supernet)[0].sampler
    names = [slot.op_set.names for slot in search_slots(supernet)]
    draw = sampler.sample
    draws: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for _ in range(reps):
        current: list[tuple[torch.Tensor, torch.Tensor]] = []
        sampler.sample = lambda k, w, current=current: current.append(draw(k, w)) or current[-1]
        with torch.no_grad():
            supernet(x)  # one forward records this step's draw of every slot
        draws.append(current)
    counts = [
        [
            {n: int((ops == i).sum()) for i, n in enumerate(op_names)}
            for (ops, _), op_names in zip(d, names, strict=True)
        ]
        for d in draws
    ]
    derived = [build_derived(c).train().to(memory_format=CL) for c in counts]

    def replay(d: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def step() -> None:
            pending = iter(d)
            sampler.sample = lambda k, w: next(pending)
            step_fn(supernet, x)()

        return step

    fns = [(replay(d), step_fn(net, x)) for d, net in zip(draws, derived, strict=True)]
    for sup, der in fns:  # warm-up: every shape once
        sup()
        der()
    times: tuple[list[float], list[float]] = ([], [])
    for pair in fns:
        for fn, acc in zip(pair, times, strict=True):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    sampler.sample = draw
    return statistics.median(times[0]), statistics.median(times[1])


def slot_benchmarks(args: argparse.Namespace) -> list[tuple[str, float, float, float | None]]:
    c, x = args.channels, torch.randn(args.batch, args.channels, args.frames, args.size, args.size)
    x = x.contiguous(memory_format=CL)
    rows = []
    for op_set in args.op_sets:
        ops = resolve_op_set(op_set)
        perf = PerformancePriority(op_set, sampling="per_channel")(
            layer="s", in_channels=c, out_channels=c, norm=nn.BatchNorm3d
        ).train()
        perf.to(memory_format=CL)
        mine, ref = paired(perf, lambda counts: ConvNorm(CakesConv3d(c, counts[0]), nn.BatchNorm3d(c)), x, args.reps)
        rows.append((f"perf-priority slot {op_set} vs derived of the same draw", mine, ref, 1.2))
        uniform = ConvNorm(CakesConv3d(c, uniform_counts(ops, c)), nn.BatchNorm3d(c)).train().to(memory_format=CL)
        t = interleaved({"perf": step_fn(perf, x), "derived": step_fn(uniform, x)}, args.reps)
        rows.append((f"perf-priority slot {op_set} vs derived with uniform counts", t["perf"], t["derived"], None))
        # cost-priority vs the sum of its branches
        cost = CostPriority(op_set)(layer="s", in_channels=c, out_channels=c, norm=nn.BatchNorm3d).train()
        branches = {name: ConvNorm(CakesConv3d(c, {name: c}), nn.BatchNorm3d(c)).train() for name in ops.names}
        for m in (cost, *branches.values()):
            m.to(memory_format=CL)
        t = interleaved({"cost": step_fn(cost, x), "branches": branches_step(list(branches.values()), x)}, args.reps)
        rows.append((f"cost-priority slot {op_set} vs its branches run separately", t["cost"], t["branches"], 1.1))
    return rows


def network_benchmark(args: argparse.Namespace) -> list[tuple[str, float, float, float | None]]:
    """Whole tiny ResNet (depth 50, width 0.125): performance-priority supernet vs derived network."""
    torch.manual_seed(0)
    x = torch.randn(args.batch * 4, 3, args.frames, 56, 56).contiguous(memory_format=CL)
    supernet = ResNet3d(operator=PerformancePriority("c123d"), depth=50, width=0.125, num_classes=8)
    supernet.train().to(memory_format=CL)
    slots = ResNet3d.slots(depth=50, width=0.125)

    def build(counts: list[dict[str, int]]) -> nn.Module:
        arch = {"backbone": "resnet3d", "op_set": "c123d", "layers": dict(zip(slots, counts, strict=True))}
        return ResNet3d(operator=Derived(arch), depth=50, width=0.125, num_classes=8)

    mine, ref = paired(supernet, build, x, args.reps)
    uniform = build([uniform_counts(resolve_op_set("c123d"), w) for w in slots.values()]).train().to(memory_format=CL)
    t = interleaved({"perf": step_fn(supernet, x), "derived": step_fn(uniform, x)}, args.reps)
    return [
        ("perf-priority tiny ResNet-50 vs derived of the same draw", mine, ref, 1.2),
        ("perf-priority tiny ResNet-50 vs derived with uniform counts", t["perf"], t["derived"], None),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--op-sets", nargs="+", default=["c12d", "c23d", "c123d"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; slot input "
        f"({args.batch}, {args.channels}, {args.frames}, {args.size}, {args.size}), channels-last; "
        f"median of {args.reps} interleaved fwd+bwd steps\n"
    )
    rows = [*slot_benchmarks(args), *network_benchmark(args)]
    print("| case | supernet ms | reference ms | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    for name, mine, ref, target in rows:
        goal = "—" if target is None else f"≤ {target}"
        print(f"| {name} | {mine * 1e3:.1f} | {ref * 1e3:.1f} | {mine / ref:.2f} | {goal} |")


if __name__ == "__main__":
    main()
