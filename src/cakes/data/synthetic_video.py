"""A synthetic Something-Something V1 look-alike, written in the real SSV1 layout.

Every video shows one textured object on a textured background (random colours, sizes,
positions, speeds, start/stop times, per-frame noise and flicker). Classes come in groups
built from one canonical motion by time reversal and/or mirroring::

    slide:  Moving something from left to right   | reversed: ... from right to left
    zoom:   Moving something towards the camera   | reversed: ... away from the camera
    push:   Pushing something from left to right  | reversed: Pulling something from right to left
            (mirrored)  Pushing ... right to left | mirrored+reversed: Pulling ... left to right
    lift:   Moving something up                   | reversed: Moving something down

A reversed class is *exactly* the time-reversed canonical video (same random draws), so
both classes of a pair have the same distribution of frame sets: a per-frame (C2D) model
with order-free pooling cannot tell them apart, a model of motion can. Mirrored classes are
exactly the h-flipped canonical video, and motion parameters are drawn left/right
symmetrically, so a flip with the left/right label swap maps each class onto itself.

Output (``root``)::

    20bn-something-something-v1/<id>/00001.jpg ...
    something-something-v1-labels.csv       class names, one per line
    something-something-v1-train.csv        <id>;<class name>
    something-something-v1-validation.csv
    synthetic_ssv1.json                     generation parameters (written last)

:class:`SyntheticSomethingSomethingDataModule` generates it on first use and reads it with the real
v1 loader. CLI: ``python -m cakes.data.synthetic_video --root DIR [--num-classes 8 ...]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cakes.data.generate import generate_atomically
from cakes.datamodules.something import SomethingSomethingDataModule

#: (class name, canonical motion, time-reversed, mirrored), in generation order.
CLASS_SPECS: tuple[tuple[str, str, bool, bool], ...] = (
    ("Moving something from left to right", "slide", False, False),
    ("Moving something from right to left", "slide", True, False),
    ("Moving something towards the camera", "zoom", False, False),
    ("Moving something away from the camera", "zoom", True, False),
    ("Pushing something from left to right", "push", False, False),
    ("Pulling something from right to left", "push", True, False),
    ("Pushing something from right to left", "push", False, True),
    ("Pulling something from left to right", "push", True, True),
    ("Moving something up", "lift", False, False),
    ("Moving something down", "lift", True, False),
)
#: ``num_classes`` values that keep every motion group whole.
VALID_NUM_CLASSES = (2, 4, 8, 10)
#: Bump when rendering changes, so old datasets are not mistaken for new ones.
GENERATOR_VERSION = 1
MARKER = "synthetic_ssv1.json"
FRAMES_DIR = "20bn-something-something-v1"
LABELS_FILE = "something-something-v1-labels.csv"
SPLIT_FILES = {"train": "something-something-v1-train.csv", "validation": "something-something-v1-validation.csv"}
_SPEC = {name: (motion, reverse, mirror) for name, motion, reverse, mirror in CLASS_SPECS}


def synthetic_class_names(num_classes: int = 8) -> list[str]:
    """The first ``num_classes`` synthetic classes, in generation order."""
    if num_classes not in VALID_NUM_CLASSES:
        raise ValueError(f"num_classes must be one of {VALID_NUM_CLASSES} (whole motion groups), got {num_classes}")
    return [name for name, *_ in CLASS_SPECS[:num_classes]]


# --------------------------------------------------------------------------- rendering
def _texture(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth random colour field ``float32 (height, width, 3)`` from a coarse random grid."""
    grid = rng.integers(60, 196, size=(*cells, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    return smooth + rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)


def _object_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Checkerboard of two random contrasting colours with a dark outline: ``float32 (h, w, 3)``."""
    colour_a = rng.uniform(0, 255, 3)
    colour_b = 255.0 - colour_a + rng.uniform(-40, 40, 3)
    cell = int(rng.integers(2, 6))
    rows, cols = np.indices((height, width))
    board = ((rows // cell + cols // cell) % 2).astype(bool)
    tex = np.where(board[..., None], colour_a, colour_b).astype(np.float32)
    tex[[0, -1], :] = tex[:, [0, -1]] = 20.0
    return tex


def _progress(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Motion progress in ``[0, 1]`` per frame: still, linear motion, still.

    The still fractions at both ends are i.i.d., so reversing time keeps the distribution.
    """
    still_start, still_end = rng.uniform(0.0, 0.25, 2) * (num_frames - 1)
    t = np.arange(num_frames, dtype=np.float64)
    span = max(num_frames - 1 - still_start - still_end, 1e-6)
    return np.clip((t - still_start) / span, 0.0, 1.0)


def _travel(rng: np.random.Generator, extent: int, body: int) -> tuple[float, float]:
    """Start < end offset of a ``body``-px body moving forward along an ``extent``-px axis.

    The body stays inside; the travel is 50-90 % of the free room and its midpoint is
    distributed symmetrically about the centre (so mirroring keeps the distribution).
    """
    room = max(extent - body, 1)
    distance = rng.uniform(0.5, 0.9) * room
    centre = rng.uniform(distance / 2, room - distance / 2)
    return centre - distance / 2, centre + distance / 2


def _paste(frame: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """Paste ``patch`` into ``frame`` at ``(top, left)``, clipped to the frame."""
    h, w = patch.shape[:2]
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, frame.shape[0]), min(left + w, frame.shape[1])
    if t1 > t0 and l1 > l0:
        frame[t0:t1, l0:l1] = patch[t0 - top : t1 - top, l0 - left : l1 - left]


def _render_canonical(motion: str, rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render the canonical (not reversed, not mirrored) video: ``uint8 (F, H, W, 3)``."""
    short = min(height, width)
    background = _texture(rng, height, width, (int(rng.integers(3, 6)), int(rng.integers(3, 6))))
    obj_h = int(rng.uniform(0.28, 0.42) * short)
    obj_w = int(np.clip(obj_h * rng.uniform(0.7, 1.4), 4, width // 2))
    texture = _object_texture(rng, obj_h, obj_w)
    progress = _progress(rng, num_frames)
    frames = np.repeat(background[None], num_frames, axis=0)

    if motion in ("slide", "push"):
        hand_w = int(obj_w * rng.uniform(0.4, 0.6)) if motion == "push" else 0
        start, end = _travel(rng, width, obj_w + hand_w)
        top = int(rng.uniform(0, height - obj_h))
        hand = None
        if motion == "push":  # skin-toned block on the trailing (left) side, touching the object
            hand_h = int(obj_h * rng.uniform(0.5, 0.8))
            skin = rng.uniform([170, 115, 85], [235, 170, 140]).astype(np.float32)
            hand = np.broadcast_to(skin, (hand_h, hand_w, 3))
            hand_top = top + int(rng.integers(0, obj_h - hand_h + 1))
        for f, p in enumerate(progress):
            left = round(start + p * (end - start))
            if hand is not None:
                _paste(frames[f], hand, hand_top, left)
            _paste(frames[f], texture, top, left + hand_w)
    elif motion == "lift":  # canonical: upwards
        start, end = _travel(rng, height, obj_h)
        left = int(rng.uniform(0, width - obj_w))
        for f, p in enumerate(progress):
            _paste(frames[f], texture, height - obj_h - round(start + p * (end - start)), left)
    elif motion == "zoom":  # canonical: growing (approaching)
        scale0 = rng.uniform(0.45, 0.65)
        centre_y = rng.uniform(obj_h / 2, height - obj_h / 2)
        centre_x = rng.uniform(obj_w / 2, width - obj_w / 2)
        patch = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
        for f, p in enumerate(progress):
            scale = scale0 + p * (1.0 - scale0)
            h, w = max(int(obj_h * scale), 1), max(int(obj_w * scale), 1)
            scaled = np.asarray(patch.resize((w, h), Image.Resampling.NEAREST), np.float32)
            _paste(frames[f], scaled, round(centre_y - h / 2), round(centre_x - w / 2))
    else:
        raise ValueError(f"unknown motion {motion!r}")

    flicker = rng.normal(0.0, 4.0, size=(num_frames, 1, 1, 1))
    noise = rng.normal(0.0, 5.0, size=frames.shape)
    return np.clip(frames + flicker + noise, 0, 255).astype(np.uint8)


def render_video(
    class_name: str, rng: np.random.Generator, num_frames: int = 16, height: int = 64, width: int = 80
) -> np.ndarray:
    """Render one video of ``class_name``: ``uint8 (num_frames, height, width, 3)``.

    The same ``rng`` state gives the canonical video, time-reversed and/or mirrored as the
    class prescribes, so e.g. ``render_video(B, rng) == render_video(A, rng)[::-1]`` exactly
    for a reversed pair ``(A, B)``.
    """
    if class_name not in _SPEC:
        raise ValueError(f"unknown synthetic class {class_name!r}")
    if num_frames < 2 or height < 16 or width < 16:
        raise ValueError(f"need num_frames >= 2 and frames >= 16x16, got {num_frames} x {height}x{width}")
    motion, reverse, mirror = _SPEC[class_name]
    frames = _render_canonical(motion, rng, num_frames, height, width)
    if reverse:
        frames = frames[::-1]
    if mirror:
        frames = frames[:, :, ::-1]
    return np.ascontiguousarray(frames)


# --------------------------------------------------------------------------- dataset
def _write_dataset(out: Path, params: dict[str, Any]) -> None:
    """Write the whole dataset into ``out``; the marker json goes last."""
    names = synthetic_class_names(params["num_classes"])
    frames_root = out / FRAMES_DIR
    frames_root.mkdir()
    (out / LABELS_FILE).write_text("".join(f"{name}\n" for name in sorted(names)), encoding="utf-8")
    video_id = 0
    for split_idx, (split, per_class) in enumerate(
        [("train", params["train_per_class"]), ("validation", params["val_per_class"])]
    ):
        lines = []
        for i in range(per_class):
            for class_idx, name in enumerate(names):
                video_id += 1
                rng = np.random.default_rng([params["seed"], split_idx, class_idx, i])
                frames = render_video(name, rng, params["num_frames"], params["height"], params["width"])
                folder = frames_root / str(video_id)
                folder.mkdir()
                for f, frame in enumerate(frames, 1):
                    Image.fromarray(frame).save(folder / f"{f:05d}.jpg", quality=90)
                lines.append(f"{video_id};{name}\n")
        (out / SPLIT_FILES[split]).write_text("".join(lines), encoding="utf-8")


def generate_synthetic_ssv1(
    root: str | os.PathLike[str],
    *,
    num_classes: int = 8,
    train_per_class: int = 96,
    val_per_class: int = 16,
    num_frames: int = 16,
    height: int = 64,
    width: int = 80,
    seed: int = 0,
) -> Path:
    """Write a synthetic SSV1-layout dataset to ``root`` (see the module docstring).

    Deterministic from ``seed``. Atomic: everything is written to a temporary folder next to
    ``root`` and renamed into place. Idempotent: returns at once if ``root`` already holds a
    complete dataset with the same parameters.

    Raises:
        FileExistsError: ``root`` is non-empty and not a dataset with these parameters.
    """
    synthetic_class_names(num_classes)  # validates num_classes
    for field, value, low in [
        ("train_per_class", train_per_class, 1),
        ("val_per_class", val_per_class, 1),
        ("num_frames", num_frames, 2),
        ("height", height, 16),
        ("width", width, 16),
    ]:
        if value < low:
            raise ValueError(f"{field} must be >= {low}, got {value}")
    root = Path(root).expanduser().absolute()
    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "seed": seed,
    }
    return generate_atomically(root, MARKER, params, lambda out: _write_dataset(out, params))


# --------------------------------------------------------------------------- data module
class SyntheticSomethingSomethingDataModule(SomethingSomethingDataModule):
    """The v1 CSV loader on synthetic data generated into ``root`` by :meth:`prepare_data`.

    Args:
        root: dataset folder; generated if missing (see :func:`generate_synthetic_ssv1`).
        num_classes, train_per_class, val_per_class, video_frames, height, width,
            generator_seed: generation parameters (``video_frames`` frames per video).
        **kwargs: loader arguments of :class:`~cakes.datamodules.something.SomethingSomethingDataModule`
            (``version`` and ``list_format`` are fixed to the official v1 CSV layout).

    ``class_names`` is known before the data exists, so the model can be built first.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        num_classes: int = 8,
        train_per_class: int = 96,
        val_per_class: int = 16,
        video_frames: int = 16,
        height: int = 64,
        width: int = 80,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, version="v1", list_format="csv", num_classes=num_classes, **kwargs)
        self.generation = {
            "num_classes": num_classes,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "num_frames": video_frames,
            "height": height,
            "width": width,
            "seed": generator_seed,
        }
        self._class_names = sorted(synthetic_class_names(num_classes))  # validates num_classes

    def prepare_data(self) -> None:
        """Generate the dataset unless ``root`` already holds it (atomic, idempotent)."""
        generate_synthetic_ssv1(self.root, **self.generation)

    def validate(self) -> None:
        """Generate the data if missing (``run.py`` validates before ``prepare_data`` runs), then check it."""
        self.prepare_data()
        super().validate()


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m cakes.data.synthetic_video", description="Write a synthetic Something-Something V1 dataset."
    )
    parser.add_argument("--root", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--num-classes", type=int, default=8, choices=VALID_NUM_CLASSES)
    parser.add_argument("--train-per-class", type=int, default=96)
    parser.add_argument("--val-per-class", type=int, default=16)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate_synthetic_ssv1(
        args.root,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        seed=args.seed,
    )
    videos = args.num_classes * (args.train_per_class + args.val_per_class)
    print(f"{root}: {videos} videos ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
