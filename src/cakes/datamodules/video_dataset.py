"""One split of videos as TSN clips (:class:`VideoClipDataset`) and the batch collate that drops
skipped samples (:class:`SkipNoneCollate`).

Batches are dicts::

    video:   float (B, 3, T, H, W), or (B, V, 3, T, H, W) with V = clips x crops views > 1
    label:   long (B,)
    index:   long (B,)   position of the video in its split (dedup key across DDP ranks)
    skipped: int         samples of this batch dropped by bad_sample="skip"
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from cakes.datamodules.video_readers import (
    BadSampleError,
    BadSampleWarning,
    MediaKind,
    VideoFile,
    count_frames,
    read_jpeg_frames,
)
from cakes.datamodules.video_transforms import (
    TSN_SCALES,
    eval_views,
    sample_eval_indices,
    sample_train_indices,
    train_transform,
)

BadSamplePolicy = Literal["fail", "skip"]
Sample = dict[str, Any]


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split, as an annotation parser lists it.

    Attributes:
        video_id: id from the list file.
        path: frame folder or video file.
        label: class index into the sorted class names.
        num_frames: frame count a frame-folder list states; ``None`` = count the folder at read time
            (video files are always counted when opened).
    """

    video_id: str
    path: Path
    label: int
    num_frames: int | None = None


class VideoClipDataset(Dataset[Sample | None]):
    """Clips of one split; ``__getitem__`` returns ``{"video", "label", "index"}`` or ``None``.

    Args:
        records: the split's videos.
        media: ``"frames"`` (jpg frame folders) or ``"video"`` (video files, read with decord).
        train: random TSN sampling + multi-scale crop + flip; else evaluation views.
        num_segments: frames per clip ``T``.
        crop_size: output side ``S``.
        short_side: evaluation resize of the short side (before the crop).
        scales: multi-scale crop scales (train).
        flip: random horizontal flip with left/right label swap (train).
        flip_map: label after a flip, per class (see :func:`~cakes.datamodules.video_transforms.flip_label_map`).
        num_clips, num_crops: evaluation views ``V = num_clips * num_crops``.
        bad_sample: ``"fail"`` raises :class:`BadSampleError`; ``"skip"`` warns and returns ``None``.
        seed: RNG seed in the main process; worker processes seed from their worker seed.

    ``video`` is ``(3, T, S, S)``, or ``(V, 3, T, S, S)`` for evaluation with ``V > 1``.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        media: MediaKind,
        train: bool,
        num_segments: int,
        crop_size: int,
        short_side: int,
        scales: Sequence[float] = TSN_SCALES,
        flip: bool = True,
        flip_map: Sequence[int] = (),
        num_clips: int = 1,
        num_crops: int = 1,
        bad_sample: BadSamplePolicy = "fail",
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.media, self.train = media, train
        self.num_segments, self.crop_size, self.short_side = num_segments, crop_size, short_side
        self.scales, self.flip, self.flip_map = tuple(scales), flip, list(flip_map)
        self.num_clips, self.num_crops = num_clips, num_crops
        self.bad_sample, self.seed = bad_sample, seed
        if train and flip and not self.flip_map:
            raise ValueError("flip=True needs flip_map (see flip_label_map)")
        self._rng: torch.Generator | None = None
        self._rng_owner: tuple[int, int | None] | None = None

    @property
    def num_views(self) -> int:
        """Views per sample: 1 for training, ``num_clips * num_crops`` for evaluation."""
        return 1 if self.train else self.num_clips * self.num_crops

    @property
    def video_shape(self) -> tuple[int, ...]:
        """Shape of one sample's ``video`` tensor."""
        clip = (3, self.num_segments, self.crop_size, self.crop_size)
        return clip if self.num_views == 1 else (self.num_views, *clip)

    def __len__(self) -> int:
        return len(self.records)

    def _process_generator(self) -> torch.Generator:
        """This process's RNG: seeded from the worker seed in a worker, else from ``seed``."""
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or self._rng_owner != owner:
            self._rng = torch.Generator().manual_seed(self.seed if info is None else info.seed)
            self._rng_owner = owner
        return self._rng

    def _read_frames(self, record: VideoRecord, indices_for: Callable[[int], np.ndarray]) -> np.ndarray:
        """Frames at ``indices_for(num_frames)`` (any shape ``S``) -> ``uint8 (*S, H, W, 3)``."""
        video = VideoFile(record.path) if self.media == "video" else None
        if video is not None:
            num_frames = video.num_frames
        else:
            num_frames = record.num_frames if record.num_frames is not None else count_frames(record.path)
        indices = indices_for(num_frames)
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = video.read(unique) if video is not None else read_jpeg_frames(record.path, unique)
        return frames[inverse.reshape(indices.shape)]

    def __getitem__(self, index: int | tuple[int, int]) -> Sample | None:
        # (index, seed) from cakes.sampler.ResumableSampler: this sample's augmentation is a pure
        # function of the seed (exact resume); a plain index uses the process generator
        index, sample_seed = index if isinstance(index, tuple) else (index, None)
        record = self.records[index]
        try:
            if self.train:
                rng = self._process_generator() if sample_seed is None else torch.Generator().manual_seed(sample_seed)
                frames = self._read_frames(record, lambda n: sample_train_indices(n, self.num_segments, rng))
                video, flipped = train_transform(frames, self.crop_size, self.scales, self.flip, rng)
                label = self.flip_map[record.label] if flipped else record.label
            else:
                frames = self._read_frames(record, lambda n: sample_eval_indices(n, self.num_segments, self.num_clips))
                views = [
                    view
                    for clip in frames  # clip-major, then crops
                    for view in eval_views(clip, self.crop_size, self.short_side, self.num_crops)
                ]
                video = views[0] if self.num_views == 1 else torch.stack(views)
                label = record.label
        except BadSampleError as err:
            if self.bad_sample == "fail":
                raise
            warnings.warn(f"skipping video {record.video_id!r}: {err}", BadSampleWarning, stacklevel=2)
            return None
        return {"video": video, "label": label, "index": index}


class SkipNoneCollate:
    """Collate samples into a batch dict, dropping ``None`` (skipped) ones.

    ``batch["skipped"]`` counts the dropped samples; an all-skipped batch has ``B = 0``
    with ``video`` of shape ``(0, *video_shape)``.
    """

    def __init__(self, video_shape: Sequence[int]) -> None:
        self.video_shape = tuple(video_shape)

    def __call__(self, samples: list[Sample | None]) -> dict[str, Tensor | int]:
        kept = [s for s in samples if s is not None]
        if kept:
            batch: dict[str, Tensor | int] = default_collate(kept)
        else:
            empty = torch.empty(0, dtype=torch.long)
            batch = {"video": torch.empty((0, *self.video_shape)), "label": empty, "index": empty.clone()}
        batch["skipped"] = len(samples) - len(kept)
        return batch
