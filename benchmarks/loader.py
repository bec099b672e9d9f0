"""Something-Something loader throughput (clips/s) for 0, 1, 2 DataLoader workers.

Two synthetic SSV1-layout datasets are generated (into a temporary folder unless
``--data-dir`` is given): the demo size (64x80 frames -> 56 px crops) and SSV1-sized frames
(100x176 -> 224 px crops, the paper's resize path). Each case times ``--clips`` clips of the
train (multi-scale crop + flip) and val (resize + centre crop) loaders after one warm-up
batch, keeps the best of ``--repeats`` runs (robust to other load on the machine) and prints
a markdown table. The main process uses ``--threads`` torch threads (workers always use 1),
so ``workers=0`` is comparable to one worker.

    python benchmarks/loader.py [--data-dir DIR] [--clips 256] [--repeats 3] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cakes.data.synthetic_video import generate_synthetic_ssv1
from cakes.datamodules import SomethingSomethingDataModule

#: name -> (generation size (height, width), crop_size, test_short_side)
CASES = {
    "demo 64x80": ((64, 80), 56, 64),
    "SSV1-size 100x176": ((100, 176), 224, 256),
}
NUM_FRAMES = 8
BATCH_SIZE = 16


def batches(loader: DataLoader) -> Iterator[dict]:
    """Cycle through ``loader`` epoch after epoch."""
    while True:
        yield from loader


def clips_per_second(loader: DataLoader, clips: int) -> float:
    """Throughput over ``clips`` clips, after one warm-up batch (worker start-up)."""
    stream = batches(loader)
    next(stream)
    seen, start = 0, time.perf_counter()
    while seen < clips:
        seen += next(stream)["video"].shape[0]
    return seen / (time.perf_counter() - start)


def run(data_dir: Path, clips: int, repeats: int, workers: list[int]) -> list[str]:
    """Benchmark every case, split and worker count; return markdown table rows."""
    rows = []
    for name, ((height, width), crop, short) in CASES.items():
        root = generate_synthetic_ssv1(
            data_dir / f"bench_{height}x{width}", train_per_class=8, val_per_class=4, height=height, width=width
        )
        for num_workers in workers:
            torch.manual_seed(0)
            dm = SomethingSomethingDataModule(
                root,
                num_frames=NUM_FRAMES,
                crop_size=crop,
                test_short_side=short,
                batch_size=BATCH_SIZE,
                num_workers=num_workers,
            )
            dm.setup("fit")
            for split in ("train", "val"):
                loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
                rate = max(clips_per_second(loader, clips) for _ in range(repeats))
                del loader  # stops its persistent workers before the next configuration
                per_worker = f"{rate / num_workers:.0f}" if num_workers else "-"
                rows.append(f"| {name} -> {crop} | {split} | {num_workers} | {rate:.0f} | {per_worker} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="where to generate (kept); default: a temporary folder")
    parser.add_argument("--clips", type=int, default=256, help="clips timed per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the best is kept")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = [
        f"T={NUM_FRAMES} frames, batch {BATCH_SIZE}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread(s) in the main process), best of {args.repeats}",
        "",
        "| frames -> crop | split | workers | clips/s | clips/s per worker |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    if args.data_dir is not None:
        rows = run(args.data_dir, args.clips, args.repeats, args.workers)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(Path(tmp), args.clips, args.repeats, args.workers)
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
