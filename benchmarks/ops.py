"""CakesConv3d vs a dense 3x3x3 ``nn.Conv3d``: forward+backward wall time on CPU.

For every (shape, split) case the two ops see the same input (``requires_grad=True``, as inside a
network) and the same upstream gradient; after a warm-up they run INTERLEAVED (dense, cakes, dense,
cakes, ...) and the MEDIAN of each is reported, which keeps the comparison fair on a busy machine.

Shapes are the ``conv2`` of each ResNet-50 stage for a batch of 2 clips of 8 frames at 224², plus the
256-channel 8x28x28 shape of the performance issue. Splits: ``thirds`` (3x3x3 / 1x3x3 / 3x1x1 as equal
as possible), ``1,2D halves`` (1x3x3 / 3x1x1), ``2,3D halves`` (3x3x3 / 1x3x3).

    time ratio = cakes ms / dense ms      MAC ratio = sum(count * volume) / (C_out * 27)

``time ratio / MAC ratio`` is 1.0 when CAKES turns its MAC savings fully into time savings.

    python benchmarks/ops.py               # default run (a few minutes on 2 cores)
    python benchmarks/ops.py --quick       # fewer repetitions
    python benchmarks/ops.py --only target --splits thirds --reps 30 --naive
    python benchmarks/ops.py --ab          # the fused op with the CPU fast path on vs off, interleaved
    python benchmarks/ops.py --fast-path off   # the whole run with the fast path off (reference form)

``--ab`` pins the execution plan to ``fused`` (the op's own kernels, no per-key choice) and times it
with the fast path on and off (``cakes.ops.fast_path``: the reference ``F.conv3d`` per group,
``torch.cat``, bias) in the same interleaved rounds; ``on/off`` < 1 is the fast path's gain.
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
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cakes.ops import fast_path, fast_path_enabled, plan, set_fast_path  # noqa: E402
from cakes.ops.conv import CakesConv3d  # noqa: E402
from cakes.ops.subkernel import SubKernel  # noqa: E402
from cakes.utils import machine_text  # noqa: E402

#: name -> (channels, T, H=W); batch is --batch
SHAPES: dict[str, tuple[int, int, int]] = {
    "res2": (64, 8, 56),
    "res3": (128, 8, 28),
    "res4": (256, 8, 14),
    "res5": (512, 8, 7),
    "target": (256, 8, 28),
}

#: input / upstream-gradient memory format (the networks run channels-last by default)
LAYOUTS = {"channels_last": torch.channels_last_3d, "ncdhw": torch.contiguous_format}

#: name -> sub-kernels, channels split as equally as possible (the remainder goes to the last ones)
SPLITS: dict[str, tuple[str, ...]] = {
    "thirds": ("3x3x3", "1x3x3", "3x1x1"),
    "1,2D halves": ("1x3x3", "3x1x1"),
    "2,3D halves": ("3x3x3", "1x3x3"),
}


def split_counts(channels: int, names: tuple[str, ...]) -> dict[str, int]:
    base, rem = divmod(channels, len(names))
    return {name: base + (1 if i >= len(names) - rem else 0) for i, name in enumerate(names)}


def mac_ratio(counts: dict[str, int]) -> float:
    return sum(n * SubKernel.parse(k).volume for k, n in counts.items()) / (sum(counts.values()) * 27)


class NaivePerGroup(nn.Module):
    """The naive form of the same op: ``F.conv3d`` per group, ``torch.cat`` (same weights)."""

    def __init__(self, op: CakesConv3d) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                F.conv3d(x, self.op.weights[sub.name], padding=sub.padding, stride=self.op.stride)
                for sub in self.op.subkernels
            ],
            dim=1,
        )


class FastPathOff(nn.Module):
    """The same op with the CPU fast path switched off for its calls (the reference per-group form)."""

    def __init__(self, op: CakesConv3d) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fast_path(False):
            return self.op(x)


def make_step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, train: bool) -> Callable[[], float]:
    params = list(module.parameters())

    def step() -> float:
        if train:
            x.grad = None
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            module(x).backward(gy)
        else:
            with torch.no_grad():
                t0 = time.perf_counter()
                module(x)
        return time.perf_counter() - t0

    return step


def bench_case(
    channels: int, frames: int, size: int, counts: dict[str, int], layout: str, args: argparse.Namespace
) -> dict:
    gen = torch.Generator().manual_seed(0)
    dense = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    cakes = CakesConv3d.from_dense(dense.weight.detach(), counts)
    fmt = LAYOUTS[layout]
    x = torch.randn(args.batch, channels, frames, size, size, generator=gen).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    gy = torch.randn(args.batch, channels, frames, size, size, generator=gen).contiguous(memory_format=fmt)
    result = {}
    for mode in ["train"] + (["eval"] if args.eval else []):
        modules = [dense, cakes]
        if args.naive:
            modules.append(NaivePerGroup(cakes))
        if args.ab:
            modules.append(FastPathOff(cakes))
        steps = tuple(make_step(m, x, gy, mode == "train") for m in modules)
        for _ in range(args.warmup):
            for step in steps:
                step()
        times: tuple[list[float], ...] = tuple([] for _ in steps)
        for _ in range(args.reps):
            for step, acc in zip(steps, times, strict=True):
                acc.append(step())
        result[mode] = tuple(statistics.median(t) * 1e3 for t in times)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per op and case (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions per op and case (default 3)")
    parser.add_argument("--quick", action="store_true", help="5 reps, 1 warm-up")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(SHAPES), default=list(SHAPES), help="shapes to run")
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=list(SPLITS),
        default=list(SPLITS),
        metavar="SPLIT",
        help=f"splits to run, from {list(SPLITS)}",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=list(LAYOUTS),
        default=list(LAYOUTS),
        help="memory formats to run (default: both; channels-last is the networks' default)",
    )
    parser.add_argument("--eval", action="store_true", help="also time forward only (no_grad)")
    parser.add_argument(
        "--naive", action="store_true", help="also time the naive per-group form (F.conv3d per group + torch.cat)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--ab",
        action="store_true",
        help="A/B: also time the op with the CPU fast path off, interleaved (plan pinned to fused)",
    )
    parser.add_argument(
        "--fast-path",
        choices=["on", "off"],
        default=None,
        help="switch the CPU fast path for the whole run (default: CAKES_FAST_PATH, else on)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 5, 1
    return args


def case_line(shape: str, layout: str, split_name: str, res: dict, mr: float, args: argparse.Namespace) -> str:
    """One printed result line: dense vs cakes, then the optional naive, fast-path-off and eval columns."""
    d, c, *extra = res["train"]
    line = f"{shape:<22} {layout:<13} {split_name:<12} {d:9.1f} {c:9.1f} {c / d:10.3f} {mr:9.3f} {c / d / mr:8.3f}"
    if args.naive:
        naive_ratio = extra[0] / d
        line += f" | naive {extra[0]:7.1f} ms, ratio {naive_ratio:.3f} ({naive_ratio / mr:.2f} x MAC)"
    if args.ab:
        line += f" | fast path off {extra[-1]:7.1f} ms, on/off {c / extra[-1]:.3f}"
    if args.eval:
        ed, ec, *eval_extra = res["eval"]
        line += f" | {ed:10.1f} {ec:10.1f} {ec / ed:10.3f}"
        if args.ab:
            line += f" | eval off {eval_extra[-1]:7.1f} ms, on/off {ec / eval_extra[-1]:.3f}"
    return line


def print_tables(rows: list[tuple], args: argparse.Namespace) -> None:
    """The markdown tables: dense vs cakes, and with ``--ab`` the fast path on vs off."""
    print()
    print(
        f"| shape (C @ TxHxW, batch {args.batch}) | layout | split | dense ms | cakes ms | time ratio | MAC ratio "
        "| time / MAC |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for shape, layout, split, d, c, tr, mr, q, _ in rows:
        print(f"| {shape} | {layout} | {split} | {d:.1f} | {c:.1f} | {tr:.3f} | {mr:.3f} | {q:.2f} |")
    if args.ab:
        print()
        print("| shape | layout | split | fast path on ms | fast path off ms | on / off |")
        print("|---|---|---|---:|---:|---:|")
        for shape, layout, split, _, c, _, _, _, off in rows:
            print(f"| {shape} | {layout} | {split} | {c:.1f} | {off:.1f} | {c / off:.3f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.fast_path is not None:
        set_fast_path(args.fast_path == "on")
    if args.ab:
        plan.configure("fused")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"{machine_text()}, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.reps} interleaved reps, medians, "
        f"conv plan {plan.mode()}, fast path {'on' if fast_path_enabled() else 'off'}"
    )
    rows = []
    header = (
        f"{'shape':<22} {'layout':<13} {'split':<12} {'dense ms':>9} {'cakes ms':>9} {'time ratio':>10} "
        f"{'MAC ratio':>9} {'time/MAC':>8}"
    )
    if args.eval:
        header += f" | {'eval dense':>10} {'eval cakes':>10} {'eval ratio':>10}"
    print(header)
    print("-" * len(header))
    for shape_name in args.only:
        channels, frames, size = SHAPES[shape_name]
        shape = f"{shape_name} {channels}@{frames}x{size}x{size}"
        for layout in args.layouts:
            for split_name in args.splits:
                counts = split_counts(channels, SPLITS[split_name])
                res = bench_case(channels, frames, size, counts, layout, args)
                d, c, *extra = res["train"]
                mr = mac_ratio(counts)
                off = extra[-1] if args.ab else None
                rows.append((shape, layout, split_name, d, c, c / d, mr, c / d / mr, off))
                print(case_line(shape, layout, split_name, res, mr, args), flush=True)
    print_tables(rows, args)


if __name__ == "__main__":
    main()
