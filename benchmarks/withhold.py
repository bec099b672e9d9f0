"""In-process A/B of one execution of the plan: full-size ResNet-50 I3D with an execution allowed and
withheld, interleaved in one process.

Each variant keeps its own plan caches (slot and 1x1x1 choices are swapped in around every call), so
both run their own best executions; "without" is the plan as it was before that execution existed.
Inference runs on copies with the batch norms folded; training steps are forward, cross-entropy and
backward in train mode. Reports medians, the median of the per-round ratios, and each
architecture's time ratio to C3D in both variants::

    python benchmarks/withhold.py packed --rounds 11
    python benchmarks/withhold.py im2col --mode train --rounds 7
    python benchmarks/withhold.py im2col --only C3D ssv1_cakes12d_c --shape 8x224:1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network import PUBLISHED, build, parse_shape  # noqa: E402

from cakes.ops import fold_batch_norms, im2col, plan  # noqa: E402
from cakes.ops.cpu import packed  # noqa: E402

#: execution -> (module, predicate) whose predicate says where it runs: withheld, it runs nowhere
GATES = {"packed": (packed, "applies"), "im2col": (im2col, "supports")}
CACHES = ("cache", "timings", "pointwise_cache", "pointwise_timings")


@contextmanager
def variant(execution: str, allowed: bool, caches: dict[bool, dict[str, dict]]) -> Iterator[None]:
    """Run a block with this variant's plan caches, and ``execution`` allowed or withheld."""
    module, gate = GATES[execution]
    saved = {name: getattr(plan._State, name) for name in CACHES}
    predicate = getattr(module, gate)
    for name in CACHES:
        setattr(plan._State, name, caches[allowed][name])
    if not allowed:
        setattr(module, gate, lambda *args, **kwargs: False)
    try:
        yield
    finally:
        setattr(module, gate, predicate)
        for name, value in saved.items():
            setattr(plan._State, name, value)


def step(net: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    """One inference (no gradient) or one training step (grads reset); returns the output."""
    params = [p for p in net.parameters() if p.requires_grad]
    target = torch.zeros(x.shape[0], dtype=torch.long)

    def train() -> torch.Tensor:
        for p in params:
            p.grad = None
        out = net(x)
        F.cross_entropy(out, target).backward()
        return out.detach()

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    return train if mode == "train" else infer


def main(argv: list[str] | None = None) -> dict[tuple[str, bool], list[float]]:
    """Run the A/B; returns the seconds of every round, ``{(network, allowed): [...]}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("execution", choices=list(GATES))
    parser.add_argument("--mode", choices=["eval", "train"], default="eval")
    parser.add_argument("--only", nargs="+", default=["C3D", *PUBLISHED])
    parser.add_argument("--shape", default="8x112:1")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (toy sizes for tests)")
    args = parser.parse_args(argv)
    if args.only[0] != "C3D":
        args.only = ["C3D", *(n for n in args.only if n != "C3D")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    x = torch.randn(parse_shape("video", args.shape)).contiguous(memory_format=cl)
    steps = {}
    for name in args.only:
        net = build("video", name, args.width, None).to(memory_format=cl)
        net = fold_batch_norms(net.eval()) if args.mode == "eval" else net.train()
        steps[name] = step(net, x, args.mode)
    caches = {allowed: {name: {} for name in CACHES} for allowed in (False, True)}
    times: dict[tuple[str, bool], list[float]] = {(n, a): [] for n in steps for a in (False, True)}
    for run in steps.values():  # warm-up: settles each variant's plan
        outputs = []
        for allowed in (False, True):
            with variant(args.execution, allowed, caches):
                outputs += [run() for _ in range(2)][-1:]
        if args.mode == "eval":  # both compute the same function (training draws dropout masks)
            torch.testing.assert_close(outputs[0], outputs[1], atol=1e-3, rtol=1e-3)
    for _ in range(args.rounds):
        for n, run in steps.items():
            for allowed in (False, True):
                with variant(args.execution, allowed, caches):
                    start = time.perf_counter()
                    run()
                    times[n, allowed].append(time.perf_counter() - start)
    e = args.execution
    print(f"{e}, {args.mode}, {args.shape}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"torch {torch.__version__}")
    print(f"| network | without {e} ms | with {e} ms | with ÷ without, median per round | to C3D, without → with |")
    print("|---|---:|---:|---:|---|")
    for n in steps:
        a, b = times[n, False], times[n, True]
        ratio = statistics.median(q / p for p, q in zip(a, b, strict=True))
        to_c3d = ""
        if n != "C3D":
            r = [
                statistics.median(t / c for t, c in zip(times[n, v], times["C3D", v], strict=True))
                for v in (False, True)
            ]
            to_c3d = f"{r[0]:.3f} → {r[1]:.3f}"
        print(f"| {n} | {statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f} | {ratio:.3f} | {to_c3d} |")
    return times


if __name__ == "__main__":
    main()
