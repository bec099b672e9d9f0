"""In-process A/B of the ``packed`` execution: full-size ResNet-50 I3D inference (batch norms folded)
with packed weights allowed and not, interleaved in one process.

Each variant keeps its own plan cache (the plan's choices are swapped in around every call), so both
run their own best executions; "unpacked" is the plan as it was before the ``packed`` execution
existed. Reports medians and the median of the per-round ratios, and each architecture's time ratio
to C3D in both variants::

    python benchmarks/packed.py --rounds 11
    python benchmarks/packed.py --only C3D ssv1_cakes12d_c --shape 8x224:1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network import PUBLISHED, build, parse_shape  # noqa: E402

from cakes.ops import fold_batch_norms, plan  # noqa: E402
from cakes.ops.cpu import packed  # noqa: E402

VARIANTS = ("unpacked", "packed")


@contextmanager
def variant(name: str, caches: dict[str, tuple[dict, dict]]) -> Iterator[None]:
    """Run a block with this variant's plan cache, and packed weights allowed or not."""
    saved, applies = (plan._State.cache, plan._State.timings), packed.applies
    plan._State.cache, plan._State.timings = caches[name]
    if name == "unpacked":
        packed.applies = lambda x, needs_grad: False
    try:
        yield
    finally:
        (plan._State.cache, plan._State.timings), packed.applies = saved, applies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=["C3D", *PUBLISHED])
    parser.add_argument("--shape", default="8x112:1")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.only[0] != "C3D":
        args.only = ["C3D", *(n for n in args.only if n != "C3D")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    x = torch.randn(parse_shape("video", args.shape)).contiguous(memory_format=cl)
    nets = {n: fold_batch_norms(build("video", n, 1.0, None).to(memory_format=cl).eval()) for n in args.only}
    caches = {v: ({}, {}) for v in VARIANTS}
    times: dict[tuple[str, str], list[float]] = {(n, v): [] for n in nets for v in VARIANTS}
    with torch.no_grad():
        for net in nets.values():  # warm-up: settles each variant's plan
            outputs = []
            for v in VARIANTS:
                with variant(v, caches):
                    outputs += [net(x) for _ in range(2)][-1:]
            torch.testing.assert_close(outputs[0], outputs[1], atol=1e-3, rtol=1e-3)
        for _ in range(args.rounds):
            for n, net in nets.items():
                for v in VARIANTS:
                    with variant(v, caches):
                        start = time.perf_counter()
                        net(x)
                        times[n, v].append(time.perf_counter() - start)
    print(f"{args.shape}, {args.threads} threads, {args.rounds} interleaved rounds; torch {torch.__version__}")
    print(
        "| network | unpacked ms | packed ms | packed ÷ unpacked, median per round | ratio to C3D, unpacked → packed |"
    )
    print("|---|---:|---:|---:|---|")
    for n in nets:
        a, b = times[n, "unpacked"], times[n, "packed"]
        ratio = statistics.median(q / p for p, q in zip(a, b, strict=True))
        to_c3d = ""
        if n != "C3D":
            r = [statistics.median(t / c for t, c in zip(times[n, v], times["C3D", v], strict=True)) for v in VARIANTS]
            to_c3d = f"{r[0]:.3f} → {r[1]:.3f}"
        ms = f"{statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f}"
        print(f"| {n} | {ms} | {ratio:.3f} | {to_c3d} |")


if __name__ == "__main__":
    main()
