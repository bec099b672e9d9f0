"""TSN-style temporal sampling and clip transforms for video classification.

Frames stay ``uint8`` through cropping, resizing (bilinear, antialiased, channels-last: the
fast CPU path) and flipping; :func:`to_normalized_clip` then makes the float ``(3, T, H, W)``
tensor the network sees. Every random draw takes an explicit ``torch.Generator`` (``None`` =
torch's global RNG), so augmentation is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255.0
_STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255.0

#: TSN's multi-scale crop scales (fractions of the short side).
TSN_SCALES = (1.0, 0.875, 0.75, 0.66)


# --------------------------------------------------------------------------- sampling
def segment_bounds(num_video_frames: int, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``[0, num_video_frames)`` into ``num_segments`` ordered index ranges.

    Returns ``(starts, ends)`` (exclusive ends), each ``(num_segments,)`` int64. With at least
    one frame per segment, the ranges tile the video (lengths differ by at most 1). A video
    shorter than ``num_segments`` gets one-frame segments spread evenly over its frames, so
    frames repeat evenly and stay in temporal order (TSN's code collapses to frame 0 here).
    """
    if num_video_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_video_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be positive, got {num_segments}")
    seg = np.arange(num_segments, dtype=np.int64)
    if num_video_frames >= num_segments:
        starts = seg * num_video_frames // num_segments
        ends = (seg + 1) * num_video_frames // num_segments
    else:
        starts = (2 * seg + 1) * num_video_frames // (2 * num_segments)
        ends = starts + 1
    return starts, ends


def sample_train_indices(
    num_video_frames: int, num_segments: int, generator: torch.Generator | None = None
) -> np.ndarray:
    """One uniformly random frame per segment: ``(num_segments,)`` 0-based indices."""
    starts, ends = segment_bounds(num_video_frames, num_segments)
    uniform = torch.rand(num_segments, dtype=torch.float64, generator=generator).numpy()
    offsets = (uniform * (ends - starts)).astype(np.int64)
    return starts + offsets


def sample_eval_indices(num_video_frames: int, num_segments: int, num_clips: int = 1) -> np.ndarray:
    """Deterministic frames for ``num_clips`` temporal views: ``(num_clips, num_segments)``.

    Clip ``k`` takes the point at ``(2k + 1) / (2 * num_clips)`` of each segment, so one clip
    is the segment centres (TSN test sampling) and more clips shift evenly within segments.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    starts, ends = segment_bounds(num_video_frames, num_segments)
    k = np.arange(num_clips, dtype=np.int64)[:, None]
    return starts[None, :] + (2 * k + 1) * (ends - starts)[None, :] // (2 * num_clips)


# --------------------------------------------------------------------------- spatial
@dataclass(frozen=True)
class CropBox:
    """A crop rectangle in pixel coordinates of the source frame."""

    top: int
    left: int
    height: int
    width: int


def multiscale_crop_sizes(
    height: int, width: int, scales: Sequence[float] = TSN_SCALES, max_distort: int = 1
) -> list[tuple[int, int]]:
    """All ``(crop_h, crop_w)`` pairs of TSN's multi-scale crop for a ``height x width`` frame.

    Each side is ``int(scale * short_side)`` for a scale in ``scales``; the two scale indices
    may differ by at most ``max_distort`` (aspect-ratio jitter).
    """
    base = min(height, width)
    sizes = [max(1, int(base * s)) for s in scales]
    return [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]


def fixed_crop_offsets(height: int, width: int, crop_h: int, crop_w: int) -> list[tuple[int, int]]:
    """TSN's 13 fixed ``(top, left)`` offsets: 4 corners, centre, 4 edge centres, 4 quarter points."""
    h_step = (height - crop_h) // 4
    w_step = (width - crop_w) // 4
    grid = [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),  # corners (top-left, top-right, ...), centre
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),  # centre-left, centre-right, bottom-centre, top-centre
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),  # quarter points
    ]
    return [(gy * h_step, gx * w_step) for gy, gx in grid]


def sample_multiscale_crop(
    height: int,
    width: int,
    scales: Sequence[float] = TSN_SCALES,
    generator: torch.Generator | None = None,
) -> CropBox:
    """Draw one TSN multi-scale crop (size pair and fixed offset) for a ``height x width`` frame."""
    sizes = multiscale_crop_sizes(height, width, scales)
    crop_h, crop_w = sizes[int(torch.randint(len(sizes), (), generator=generator))]
    offsets = fixed_crop_offsets(height, width, crop_h, crop_w)
    top, left = offsets[int(torch.randint(len(offsets), (), generator=generator))]
    return CropBox(top, left, crop_h, crop_w)


def resize(clip: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (antialiased) resize of ``uint8 (T, 3, H, W)`` frames to ``size = (h, w)``."""
    if tuple(clip.shape[-2:]) == size:
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True)


def resize_short_side(clip: Tensor, short_side: int) -> Tensor:
    """Resize ``uint8 (T, 3, H, W)`` frames so ``min(H, W) == short_side`` (aspect kept)."""
    height, width = clip.shape[-2:]
    if height <= width:
        return resize(clip, (short_side, int(width * short_side / height)))
    return resize(clip, (int(height * short_side / width), short_side))


def eval_crop_boxes(height: int, width: int, crop_size: int, num_crops: int) -> list[CropBox]:
    """Square evaluation crops: 1 = centre; 3 = start, centre, end of the long side."""
    if crop_size > min(height, width):
        raise ValueError(f"crop {crop_size} does not fit a {height}x{width} frame")
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    if num_crops == 1:
        return [CropBox(top, left, crop_size, crop_size)]
    if num_crops == 3:
        if height > width:
            return [CropBox(t, left, crop_size, crop_size) for t in (0, top, height - crop_size)]
        return [CropBox(top, x, crop_size, crop_size) for x in (0, left, width - crop_size)]
    raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")


def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """``uint8 (T, H, W, 3)`` -> ``uint8 (T, 3, H, W)``, channels-last (a view, no copy)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def crop(clip: Tensor, box: CropBox) -> Tensor:
    """Crop ``(..., H, W)`` to ``box``."""
    return clip[..., box.top : box.top + box.height, box.left : box.left + box.width]


def to_normalized_clip(clip: Tensor) -> Tensor:
    """``uint8 (T, 3, H, W)`` -> ImageNet-normalised contiguous ``float32 (3, T, H, W)``."""
    out = clip.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
    return out.sub_(_MEAN_255).div_(_STD_255)


def train_transform(
    frames: np.ndarray,
    crop_size: int,
    scales: Sequence[float] = TSN_SCALES,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, bool]:
    """Multi-scale crop (one box for the whole clip), resize, optional random h-flip, normalise.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
    Returns:
        ``(clip, flipped)`` with ``clip`` float ``(3, T, crop_size, crop_size)``. The flip is
        drawn last, so with the same RNG state the crop is the same whether ``flip`` is on.
    """
    box = sample_multiscale_crop(frames.shape[1], frames.shape[2], scales, generator)
    clip = resize(crop(frames_to_tensor(frames), box), (crop_size, crop_size))
    flipped = flip and bool(torch.rand((), generator=generator) < 0.5)
    if flipped:
        clip = clip.flip(-1)
    return to_normalized_clip(clip), flipped


def eval_views(frames: np.ndarray, crop_size: int, short_side: int, num_crops: int = 1) -> list[Tensor]:
    """Resize the short side, take ``num_crops`` square crops, normalise.

    Args:
        frames: ``uint8 (T, H, W, 3)``.
    Returns:
        ``num_crops`` float tensors ``(3, T, crop_size, crop_size)``.
    """
    clip = resize_short_side(frames_to_tensor(frames), short_side)
    boxes = eval_crop_boxes(clip.shape[-2], clip.shape[-1], crop_size, num_crops)
    return [to_normalized_clip(crop(clip, box)) for box in boxes]


# --------------------------------------------------------------------------- labels
_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def swap_left_right(name: str) -> str:
    """Exchange the words ``left`` and ``right`` in a class name."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], name)


def flip_label_map(class_names: Sequence[str]) -> list[int]:
    """Label after a horizontal flip, for each class index.

    Classes ``a`` and ``b`` pair when swapping ``left``/``right`` in ``a`` gives ``b``
    (e.g. "Pushing something from left to right" <-> "... from right to left"); every other
    class maps to itself.
    """
    index = {name: i for i, name in enumerate(class_names)}
    return [index.get(swap_left_right(name), i) for i, name in enumerate(class_names)]
