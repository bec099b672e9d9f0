"""What oneDNN's output-channel blocks cost the published architectures.

oneDNN's CPU convolutions compute output channels in blocks (16 float32 lanes with AVX-512, 8 with
AVX2), so a group of ``n`` output channels costs about ``ceil(n / b) · b`` channels' work: the
published architectures' odd group widths (34, 59, 109, 153, …) waste part of a block each, C3D's
widths (64…512) none. This script reports

* the **width sawtooth**: one packed oneDNN convolution (as the ``packed`` execution runs it) at
  output widths around a block boundary, ms and GMAC/s (``--widths``);
* the **blocked slot MACs**: the slot convolutions' MACs with every group rounded up to ``b``
  channels, against the closed form, per architecture; the same for the units the ``fused`` and
  ``packed`` executions run (a partial block filled with the next group's leading rows when its
  sub-kernel fits: :func:`filled_cost`), and for the best contiguous regrouping
  (:func:`regrouped_cost`, computed, not run); and — given a ``benchmarks/network.py`` JSON —
  the **blocked bound**: the time ÷ MAC an architecture would reach if its convolutions ran at
  C3D's speed per *block* rather than per MAC (the network tool's bound uses MACs)::

      blocked bound ÷ MAC = (T_rest + (T_base - T_rest) · B_arch / B_base) / T_base / MAC ratio

  with ``B`` the blocked slot MACs of the units the executions run (filled blocks).

    python benchmarks/blocks.py --json benchmarks/results/network_video_xeon_run10.json
    python benchmarks/blocks.py --widths --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network import PUBLISHED, build  # noqa: E402

from cakes.ops import CakesConv3d  # noqa: E402
from cakes.ops.cpu import torch_shim  # noqa: E402
from cakes.ops.cpu.units import plan_units  # noqa: E402
from cakes.ops.homogeneous import SubKernelConv3d  # noqa: E402
from cakes.ops.subkernel import SubKernel  # noqa: E402

#: the groups of one slot convolution, ``(kernel size, output channels)`` in order
Groups = list[tuple[tuple[int, int, int], int]]
#: one slot convolution: (output pixels per sample · input channels, its groups)
Layer = tuple[int, Groups]


def slot_layers(name: str, frames: int = 8, side: int = 112) -> list[Layer]:
    """Every slot convolution of ResNet-50 I3D network ``name`` (built on the meta device)."""
    with torch.device("meta"):
        net = build("video", name, 1.0, None)
    layers: list[Layer] = []

    def record(module: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        if isinstance(module, CakesConv3d):
            scale = math.prod(out.shape[2:]) * module.in_channels
            layers.append((scale, [(s.size, n) for s, n in zip(module.subkernels, module.group_sizes, strict=True)]))
        else:
            w = module.weight
            layers.append((math.prod(out.shape[2:]) * w.shape[1], [(tuple(w.shape[2:]), w.shape[0])]))

    for path, module in net.named_modules():
        if isinstance(module, CakesConv3d) or (isinstance(module, SubKernelConv3d) and path.startswith("layer")):
            module.register_forward_hook(record)
    with torch.device("meta"):
        net(torch.empty(1, 3, frames, side, side))
    return layers


def blocked_cost(groups: Groups, block: int) -> int:
    """Cost, per pixel and input channel, of one convolution per group with its output channels
    rounded up to ``block`` (``block=1``: the closed-form MACs)."""
    return sum(math.ceil(n / block) * block * math.prod(size) for size, n in groups)


def union_volume(sizes: set[tuple[int, int, int]]) -> int:
    """Volume of the smallest kernel holding every sub-kernel in ``sizes`` (centred)."""
    return math.prod(max(size[axis] for size in sizes) for axis in range(3))


def regrouped_cost(groups: Groups, block: int) -> int:
    """Least blocked cost, per pixel and input channel, of the layer's output channels (in group order)
    cut into contiguous segments, each run as one convolution with the union of its sub-kernels
    (zero-padded): ``sum(ceil(width / block) · block · union volume)``, by dynamic programming."""
    channels = [size for size, n in groups for _ in range(n)]
    best = [0] + [math.inf] * len(channels)
    for stop in range(1, len(channels) + 1):
        for start in range(stop):
            cost = math.ceil((stop - start) / block) * block * union_volume(set(channels[start:stop]))
            best[stop] = min(best[stop], best[start] + cost)
    return int(best[-1])


def filled_cost(groups: Groups, block: int) -> int:
    """Blocked cost, per pixel and input channel, of the units the fused and packed executions run
    (:func:`cakes.ops.cpu.units.plan_units`: a partial block filled with the next group's rows)."""
    subs = [SubKernel(size, max(size)) for size, _ in groups]
    units = plan_units(subs, [n for _, n in groups], (1, 1, 1), block)
    return sum(math.ceil((u.stop - u.start) / block) * block * u.sub.volume for u in units)


def total(layers: list[Layer], cost: Callable[[Groups, int], int], block: int) -> int:
    """A per-layer cost summed over the network, weighted by each layer's pixels · input channels."""
    return sum(scale * cost(groups, block) for scale, groups in layers)


def bound_ratio(t_base: float, t_rest: float, slot_ratio: float) -> float:
    """Time ratio to the baseline if the slot convolutions took ``slot_ratio`` of the baseline's."""
    return (t_rest + (t_base - t_rest) * slot_ratio) / t_base


def blocked_table(block: int, result: Path | None) -> None:
    base = slot_layers("C3D")
    exact_base, blocked_base = total(base, blocked_cost, 1), total(base, blocked_cost, block)
    rows = json.loads(result.read_text()) if result else None
    header = (
        f"| network | slot MAC ratio | {block}-blocked slot MAC ratio | blocked ÷ exact | filled ÷ exact"
        " | best regrouping ÷ exact |"
    )
    if rows:
        header += " mode | time ÷ MAC | bound ÷ MAC | blocked bound ÷ MAC |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in ("C2D", "P3D", *PUBLISHED):
        layers = slot_layers(name)
        macs = total(layers, blocked_cost, 1)
        exact, blocked = macs / exact_base, total(layers, blocked_cost, block) / blocked_base
        filled, regrouped = (total(layers, cost, block) / macs for cost in (filled_cost, regrouped_cost))
        cells = f"| {name} | {exact:.3f} | {blocked:.3f} | {blocked / exact:.3f} | {filled:.3f} | {regrouped:.3f} |"
        if not rows:
            print(cells)
            continue
        for row in rows["rows"]:
            if row["arch"] != name:
                continue
            for mode in ("train", "eval"):
                times = rows["times"][f"{row['shape']} {name}"].get(mode)
                if not times:
                    continue
                t_base, t_rest = statistics.median(times["C3D"]), statistics.median(times["C3D (no slot convs)"])
                t_arch, mac_ratio = statistics.median(times[name]), row["mac_ratio"]

                # the units the executions run (C3D's full-width groups fill their blocks: its ratio is exact)
                bound, blocked_bound = (bound_ratio(t_base, t_rest, r) / mac_ratio for r in (exact, exact * filled))
                print(f"{cells} {mode} | {t_arch / t_base / mac_ratio:.2f} | {bound:.2f} | {blocked_bound:.2f} |")


def width_sawtooth(reps: int) -> None:
    if not torch_shim.PACKED_CONVOLUTION:
        raise SystemExit("--widths needs oneDNN's packed convolution (torch_shim.PACKED_CONVOLUTION)")
    print("| C_in, frames x side | kernel | " + " | ".join(["width: ms (GMAC/s)"] * 5) + " |")
    print("|---|---|" + "---|" * 5)
    for c_in, side in ((64, 28), (256, 7), (512, 4)):
        x = torch.randn(1, c_in, 8, side, side).contiguous(memory_format=torch.channels_last_3d)
        for kernel in ((3, 3, 3), (1, 3, 3), (3, 1, 1)):
            padding = [k // 2 for k in kernel]
            cells = []
            for width in (c_in // 2 - 2, c_in // 2, c_in // 2 + 2, c_in * 3 // 4, c_in):
                w = torch.randn(width, c_in, *kernel) * 0.02
                packed = torch_shim.pack_convolution_weight(w, padding, [1, 1, 1], list(x.shape))
                times = []
                with torch.no_grad():
                    for rep in range(3 + reps):
                        start = time.perf_counter()
                        torch_shim.convolve_packed(x, packed, None, padding, [1, 1, 1])
                        if rep >= 3:
                            times.append(time.perf_counter() - start)
                ms = statistics.median(times) * 1e3
                gmacs = 8 * side * side * c_in * width * math.prod(kernel) / ms / 1e6
                cells.append(f"{width}: {ms:.2f} ({gmacs:.0f})")
            print(f"| {c_in}, 8x{side} | {'x'.join(map(str, kernel))} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=16, help="output channels per block (16: AVX-512, 8: AVX2)")
    parser.add_argument("--json", type=Path, help="a benchmarks/network.py JSON (video) for the blocked bound")
    parser.add_argument("--widths", action="store_true", help="time the width sawtooth instead")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.widths:
        width_sawtooth(args.reps)
    else:
        blocked_table(args.block, args.json)


if __name__ == "__main__":
    main()
