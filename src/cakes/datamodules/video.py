"""The video data module base: TSN clip sampling and augmentation, loaders, bad-sample handling and
the complete data check, for any dataset of labelled videos stored as jpg frame folders or video files.

A new dataset subclasses :class:`VideoDataModule` and implements only its annotation parser:
:meth:`~VideoDataModule.read_class_names` and :meth:`~VideoDataModule.parse_annotations`
(see :class:`cakes.datamodules.something.SomethingSomethingDataModule`). Batches are those of
:mod:`cakes.datamodules.video_dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from cakes.datamodules.base import SplitDataModule
from cakes.datamodules.checks import Section, map_items
from cakes.datamodules.video_dataset import BadSamplePolicy, SkipNoneCollate, VideoClipDataset, VideoRecord
from cakes.datamodules.video_readers import CHECK_BY_MEDIA, MediaKind
from cakes.datamodules.video_transforms import TSN_SCALES, flip_label_map
from cakes.sampler import train_sampler

#: The annotated splits; the validation split doubles as the test split.
Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")


def check_loader_arguments(
    *,
    num_frames: int,
    crop_size: int,
    test_short_side: int,
    train_scales: Sequence[float],
    val_views: tuple[int, int],
    test_views: tuple[int, int],
    batch_size: int,
    num_workers: int,
    num_classes: int | None,
    bad_sample: str,
) -> None:
    """Raise ``ValueError`` naming the first argument of :class:`VideoDataModule` out of range."""
    if bad_sample not in ("fail", "skip"):
        raise ValueError(f"bad_sample must be 'fail' or 'skip', got {bad_sample!r}")
    for name, value in [
        ("num_frames", num_frames),
        ("crop_size", crop_size),
        ("batch_size", batch_size),
        ("val_clips", val_views[0]),
        ("test_clips", test_views[0]),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value in [("val_crops", val_views[1]), ("test_crops", test_views[1])]:
        if value not in (1, 3):
            raise ValueError(f"{name} must be 1 or 3, got {value}")
    if test_short_side < crop_size:
        raise ValueError(f"test_short_side ({test_short_side}) must be >= crop_size ({crop_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not train_scales or not all(0 < float(s) <= 1 for s in train_scales):
        raise ValueError(f"train_scales must be non-empty fractions in (0, 1], got {list(train_scales)}")


def listing_problems(
    records: Sequence[VideoRecord], split: str, num_classes: int, first_split: dict[str, str]
) -> list[tuple[str, str]]:
    """``(video, reason)`` for labels outside ``0..num_classes-1`` and ids listed in an earlier split.

    ``first_split`` maps every id seen so far to its split; this split's ids are added.
    """
    problems = []
    for record in records:
        name = repr(record.video_id)
        if not 0 <= record.label < num_classes:
            problems.append((name, f"label {record.label} outside 0..{num_classes - 1}"))
        if record.video_id in first_split:
            problems.append((name, f"also listed in {first_split[record.video_id]}"))
        first_split.setdefault(record.video_id, split)
    return problems


class VideoDataModule(SplitDataModule):
    """Labelled videos with TSN sampling and augmentation; subclasses parse the annotations.

    Subclass hooks (the annotation parser):

    * :meth:`read_class_names` -- the sorted class names (cheap; called before :meth:`setup` to
      build the model);
    * :meth:`parse_annotations` -- the videos of a split, each a
      :class:`~cakes.datamodules.video_dataset.VideoRecord` (errors name file and line);
    * optionally :attr:`media` (how the videos are stored) and :meth:`annotation_source` (the file
      error messages name).

    Args:
        root: dataset folder.
        num_classes: expected number of classes, checked against :meth:`read_class_names`;
            ``None`` = whatever the annotations list.
        num_frames: segments ``T`` sampled per clip.
        crop_size: network input side ``S``.
        test_short_side: short side of the resize before the centre crop (val and test).
        train_scales: multi-scale crop scales, fractions of the short side.
        flip: random horizontal flip in training, swapping left/right classes.
        val_clips, val_crops, test_clips, test_crops: temporal clips x spatial crops (1 or 3)
            per validation / test video.
        batch_size: per device.
        num_workers: DataLoader workers per device.
        bad_sample: unreadable video -> ``"fail"`` (raise, naming the file) or ``"skip"``
            (drop it, warn with :class:`~cakes.datamodules.video_readers.BadSampleWarning`, count in
            ``batch["skipped"]``).
        balanced_batches: stratified training order: every class equally often in each batch
            (:func:`cakes.sampler.stratified_permutation`). For few-class data: with 4 classes
            at batch 16, each batch's label imbalance otherwise dominates the classifier's gradient.

    ``class_names`` / ``num_classes`` read only the class list, so they work before :meth:`setup`.
    :meth:`validate` checks every annotation file before training; :meth:`setup` parses the splits
    its stage needs; :meth:`check_items` decodes every video. The test split is the validation split.
    """

    #: How the videos are stored: ``"frames"`` (jpg folders) or ``"video"`` (files read with decord).
    media: MediaKind = "frames"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        num_classes: int | None = None,
        num_frames: int = 8,
        crop_size: int = 224,
        test_short_side: int = 256,
        train_scales: Sequence[float] = TSN_SCALES,
        flip: bool = True,
        val_clips: int = 1,
        val_crops: int = 1,
        test_clips: int = 1,
        test_crops: int = 1,
        batch_size: int = 12,
        num_workers: int = 8,
        bad_sample: BadSamplePolicy = "fail",
        balanced_batches: bool = False,
    ) -> None:
        super().__init__()
        check_loader_arguments(
            num_frames=num_frames,
            crop_size=crop_size,
            test_short_side=test_short_side,
            train_scales=train_scales,
            val_views=(val_clips, val_crops),
            test_views=(test_clips, test_crops),
            batch_size=batch_size,
            num_workers=num_workers,
            num_classes=num_classes,
            bad_sample=bad_sample,
        )
        self.root = Path(root).expanduser()
        self.balanced_batches = bool(balanced_batches)
        self.expected_num_classes = num_classes
        self.num_frames, self.crop_size, self.test_short_side = num_frames, crop_size, test_short_side
        self.train_scales = tuple(float(s) for s in train_scales)
        self.flip = flip
        self.val_views = (val_clips, val_crops)
        self.test_views = (test_clips, test_crops)
        self.batch_size, self.num_workers, self.bad_sample = batch_size, num_workers, bad_sample

        self._class_names: list[str] | None = None
        self.train_set: VideoClipDataset | None = None
        self.val_set: VideoClipDataset | None = None
        self.test_set: VideoClipDataset | None = None

    # ----------------------------------------------------------------- the annotation parser (subclasses)
    def read_class_names(self) -> list[str]:
        """The sorted class names; label ``i`` is ``names[i]``. Raises naming a missing or bad file."""
        raise NotImplementedError

    def parse_annotations(self, split: Split) -> list[VideoRecord]:
        """The videos of ``split`` in list order (labels index :meth:`read_class_names`).

        Raises:
            FileNotFoundError: an annotation file or the media folder is missing (path named).
            ValueError: a malformed entry (file and line named), unknown class, duplicate id.
        """
        raise NotImplementedError

    def annotation_source(self, part: Literal["classes", "train", "val"]) -> str:
        """The file (or folder) that lists ``part``, as error messages name it."""
        return f"{self.root} ({part})"

    # ----------------------------------------------------------------- classes
    @property
    def class_names(self) -> list[str]:
        """Alphabetically sorted class names; label ``i`` is ``class_names[i]``."""
        if self._class_names is None:
            self._class_names = self.read_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes (reads the class list on first use)."""
        return len(self.class_names)

    def load_class_names(self) -> list[str]:
        """Re-read the class list and check it against ``num_classes`` and earlier reads."""
        names = self.read_class_names()
        source = self.annotation_source("classes")
        if self.expected_num_classes is not None and len(names) != self.expected_num_classes:
            raise ValueError(f"{source}: {len(names)} classes, but num_classes={self.expected_num_classes}")
        if self._class_names is not None and names != self._class_names:
            raise ValueError(f"{source}: class names differ from those read before (file changed?)")
        self._class_names = names
        return names

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check the class list and both split lists, before any model is built (raises as
        :meth:`parse_annotations`; a class count differing from ``num_classes`` is a ``ValueError``)."""
        self.load_class_names()
        for split in SPLITS:
            self.parse_annotations(split)

    def check_items(self, workers: int = 1) -> list[Section]:
        """Check every listed video completely (``python -m cakes.check_data``), decoding every frame in
        ``workers`` processes: a ``lists`` section (annotation files), then one section per split."""
        lists = Section("lists")
        try:
            self.validate()
            names = self.class_names
        except (OSError, ValueError) as err:
            lists.bad.append(("format", str(err)))
            return [lists]
        lists.items = 1 + len(SPLITS)
        lists.units = {"classes": len(names)}
        sections, first_split = [lists], {}
        for split in SPLITS:
            records = self.parse_annotations(split)
            section = Section(split, items=len(records))
            section.bad += listing_problems(records, split, len(names), first_split)
            jobs = [(r.video_id, str(r.path), r.num_frames) for r in records]
            decoded = 0
            for video_id, frames, problem in map_items(CHECK_BY_MEDIA[self.media], jobs, workers):
                decoded += frames
                if problem:
                    section.bad.append((repr(video_id), problem))
            section.units = {"frames decoded": decoded}
            sections.append(section)
        return sections

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Parse and check the class list and the splits needed for ``stage`` (raises as :meth:`validate`)."""
        if stage not in (None, "fit", "validate", "test"):
            raise ValueError(f"unsupported stage {stage!r} (fit, validate or test)")
        names = self.load_class_names()
        flip_map = flip_label_map(names)
        common: dict[str, Any] = {
            "media": self.media,
            "num_segments": self.num_frames,
            "crop_size": self.crop_size,
            "short_side": self.test_short_side,
            "bad_sample": self.bad_sample,
        }
        if stage in (None, "fit"):
            train_records = self.parse_annotations("train")
            world_size = self.trainer.world_size if self.trainer is not None else 1
            if len(train_records) // world_size < self.batch_size:
                raise ValueError(
                    f"{self.annotation_source('train')}: {len(train_records)} videos over {world_size} device(s) "
                    f"is less than one batch of batch_size={self.batch_size}"
                )
            self.train_set = VideoClipDataset(
                train_records, train=True, scales=self.train_scales, flip=self.flip, flip_map=flip_map, **common
            )
        val_records = self.parse_annotations("val")  # the validation split is the test split

        def eval_set(clips: int, crops: int) -> VideoClipDataset:
            return VideoClipDataset(val_records, train=False, num_clips=clips, num_crops=crops, **common)

        if stage in (None, "fit", "validate"):
            self.val_set = eval_set(*self.val_views)
        if stage in (None, "test"):
            self.test_set = eval_set(*self.test_views)

    # ----------------------------------------------------------------- loaders
    def _augmentation_seed(self) -> int:
        """Augmentation seed from the global torch seed, the rank and the epoch."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        state = np.random.SeedSequence([torch.initial_seed(), rank, epoch]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))

    def make_loader(self, dataset: VideoClipDataset, train: bool) -> DataLoader:
        """The loader of ``dataset``; training order and augmentation a pure function of (seed, epoch),
        starting at the resume point."""
        generator, sampler = None, None
        if train:
            dataset.seed = self._augmentation_seed()
            generator = torch.Generator().manual_seed(dataset.seed)  # worker seeds
            labels = [record.label for record in dataset.records] if self.balanced_batches else None
            sampler = train_sampler(dataset, self.trainer, batch_size=self.batch_size, with_seeds=True, labels=labels)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=SkipNoneCollate(dataset.video_shape),
            generator=generator,
        )
