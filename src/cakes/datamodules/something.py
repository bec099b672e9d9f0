"""Something-Something V1 (jpg frames) and V2 (webm videos) for PyTorch Lightning.

Layouts under ``root`` (file names are arguments; these are the defaults)::

    v1, list_format="csv":  20bn-something-something-v1/<id>/00001.jpg ...
                            something-something-v1-labels.csv        class name per line
                            something-something-v1-{train,validation}.csv   "<id>;<class name>"
    v1, list_format="trn":  same frames; category.txt (class name per line),
                            {train,val}_videofolder.txt   "<id> <num_frames> <label_idx>"
    v2, list_format="json": 20bn-something-something-v2/<id>.webm
                            something-something-v2-labels.json       {"class name": "idx"}
                            something-something-v2-{train,validation}.json
                                [{"id": ..., "template": "Pushing [something] ..."}, ...]

Labels index ``class_names``, the alphabetically sorted class list (TRN lists index the same
order). The published validation split doubles as the test split.

Batches are dicts::

    video:   float (B, 3, T, H, W), or (B, V, 3, T, H, W) with V = clips x crops views > 1
    label:   long (B,)
    index:   long (B,)   position of the video in its split (dedup key across DDP ranks)
    skipped: int         samples of this batch dropped by bad_sample="skip"
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from cakes.data.synthetic_video import generate_synthetic_ssv1, synthetic_class_names
from cakes.datamodules.base import SplitDataModule
from cakes.datamodules.video_transforms import (
    TSN_SCALES,
    eval_views,
    flip_label_map,
    sample_eval_indices,
    sample_train_indices,
    train_transform,
)
from cakes.sampler import train_sampler

Version = Literal["v1", "v2"]
ListFormat = Literal["csv", "trn", "json"]
BadSamplePolicy = Literal["fail", "skip"]
Sample = dict[str, Any]

#: (version, list_format) -> (media dir, labels file, train file, validation file)
OFFICIAL_FILES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("v1", "csv"): (
        "20bn-something-something-v1",
        "something-something-v1-labels.csv",
        "something-something-v1-train.csv",
        "something-something-v1-validation.csv",
    ),
    ("v1", "trn"): (
        "20bn-something-something-v1",
        "category.txt",
        "train_videofolder.txt",
        "val_videofolder.txt",
    ),
    ("v2", "json"): (
        "20bn-something-something-v2",
        "something-something-v2-labels.json",
        "something-something-v2-train.json",
        "something-something-v2-validation.json",
    ),
}
DEFAULT_LIST_FORMAT: dict[str, str] = {"v1": "csv", "v2": "json"}
_FRAME_NAME = re.compile(r"(\d{5})\.jpg")


class BadSampleError(RuntimeError):
    """A video that cannot be read; the message names the offending file."""


class BadSampleWarning(UserWarning):
    """A bad video was skipped under ``bad_sample="skip"``; the message names the file."""


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split.

    Attributes:
        video_id: id from the list file.
        path: frame folder (v1) or video file (v2).
        label: class index into the sorted class names.
        num_frames: frame count from a TRN list; ``None`` = count the folder at read time.
    """

    video_id: str
    path: Path
    label: int
    num_frames: int | None = None


# --------------------------------------------------------------------------- list files
def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank stripped lines of a text file with their 1-based line numbers."""
    text = path.read_text(encoding="utf-8")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_list(path: Path) -> list[str]:
    """Class names from a one-name-per-line file (v1 labels CSV, TRN category.txt), sorted."""
    _require_file(path, "labels file")
    seen: dict[str, int] = {}
    for n, name in _lines(path):
        if name in seen:
            raise ValueError(f"{path}:{n}: duplicate class {name!r} (first on line {seen[name]})")
        seen[name] = n
    if not seen:
        raise ValueError(f"{path}: no class names")
    return sorted(seen)


def read_v2_class_json(path: Path) -> list[str]:
    """Class names from the v2 labels json ``{"name": "idx"}``, sorted.

    The file's indices must be ``0..C-1``; labels follow the sorted order, and a warning says
    so if the file numbers classes differently.
    """
    data = _read_json(path, "labels file")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{class name: index}}")
    try:
        indices = {name: int(idx) for name, idx in data.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: class indices must be integers ({err})") from err
    if sorted(indices.values()) != list(range(len(indices))):
        raise ValueError(f"{path}: class indices are not 0..{len(indices) - 1}")
    names = sorted(indices)
    if [indices[name] for name in names] != list(range(len(names))):
        warnings.warn(
            f"{path}: class indices are not in alphabetical order; labels use the sorted order",
            stacklevel=2,
        )
    return names


def _read_json(path: Path, what: str) -> Any:
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def _check_id(path: Path, where: str, video_id: str) -> None:
    if not video_id or video_id in (".", "..") or "/" in video_id or "\\" in video_id:
        raise ValueError(f"{path}:{where}: invalid video id {video_id!r}")


def _add(records: dict[str, tuple[str, VideoRecord]], path: Path, where: str, rec: VideoRecord) -> None:
    if rec.video_id in records:
        raise ValueError(f"{path}:{where}: duplicate video id {rec.video_id!r} (first at {records[rec.video_id][0]})")
    records[rec.video_id] = (where, rec)


def _finish(records: dict[str, tuple[str, VideoRecord]], path: Path) -> list[VideoRecord]:
    if not records:
        raise ValueError(f"{path}: no videos listed")
    return [rec for _, rec in records.values()]


def parse_v1_csv(path: Path, class_names: Sequence[str], frames_root: Path) -> list[VideoRecord]:
    """Parse an official v1 split file of ``<id>;<class name>`` lines."""
    _require_file(path, "split file")
    index = {name: i for i, name in enumerate(class_names)}
    records: dict[str, tuple[str, VideoRecord]] = {}
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split(";")]
        if len(fields) != 2:
            raise ValueError(f"{path}:{n}: expected '<id>;<class name>', got {line!r}")
        video_id, name = fields
        _check_id(path, str(n), video_id)
        if name not in index:
            raise ValueError(f"{path}:{n}: class {name!r} is not in the labels file")
        _add(records, path, str(n), VideoRecord(video_id, frames_root / video_id, index[name]))
    return _finish(records, path)


def parse_trn_list(path: Path, num_classes: int, frames_root: Path) -> list[VideoRecord]:
    """Parse a TRN/TSM list of ``<id> <num_frames> <label_idx>`` lines."""
    _require_file(path, "split file")
    records: dict[str, tuple[str, VideoRecord]] = {}
    for n, line in _lines(path):
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{path}:{n}: expected '<id> <num_frames> <label_idx>', got {line!r}")
        video_id, frames, label = fields
        _check_id(path, str(n), video_id)
        try:
            num_frames, label_idx = int(frames), int(label)
        except ValueError:
            raise ValueError(f"{path}:{n}: num_frames and label_idx must be integers, got {line!r}") from None
        if num_frames < 1:
            raise ValueError(f"{path}:{n}: num_frames must be positive, got {num_frames}")
        if not 0 <= label_idx < num_classes:
            raise ValueError(f"{path}:{n}: label index {label_idx} out of range [0, {num_classes})")
        _add(records, path, str(n), VideoRecord(video_id, frames_root / video_id, label_idx, num_frames))
    return _finish(records, path)


def parse_v2_json(path: Path, class_names: Sequence[str], videos_root: Path) -> list[VideoRecord]:
    """Parse an official v2 split json; the class is ``template`` without brackets."""
    data = _read_json(path, "split file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of videos")
    index = {name: i for i, name in enumerate(class_names)}
    records: dict[str, tuple[str, VideoRecord]] = {}
    for k, entry in enumerate(data):
        where = f"entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str | int) or "template" not in entry:
            raise ValueError(f"{path}:{where}: expected an object with 'id' and 'template', got {entry!r}")
        video_id = str(entry["id"])
        _check_id(path, where, video_id)
        name = str(entry["template"]).replace("[", "").replace("]", "")
        if name not in index:
            raise ValueError(f"{path}:{where}: class {name!r} (id {video_id}) is not in the labels file")
        _add(records, path, where, VideoRecord(video_id, videos_root / f"{video_id}.webm", index[name]))
    return _finish(records, path)


# --------------------------------------------------------------------------- reading
def count_frames(folder: Path) -> int:
    """Number of frames ``00001.jpg .. 0000N.jpg`` in ``folder``; a gap is a bad sample."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise BadSampleError(f"frame folder missing: {folder}") from None
    numbers = {int(m.group(1)) for m in map(_FRAME_NAME.fullmatch, names) if m}
    if not numbers:
        raise BadSampleError(f"no frames named 00001.jpg ... in {folder}")
    if len(numbers) != max(numbers):
        missing = min(set(range(1, max(numbers) + 1)) - numbers)
        raise BadSampleError(f"missing frame: {folder / f'{missing:05d}.jpg'}")
    return len(numbers)


def read_jpeg_frames(folder: Path, indices: np.ndarray) -> np.ndarray:
    """Decode 0-based frame ``indices`` of a v1 frame folder -> ``uint8 (K, H, W, 3)``."""
    frames = []
    for i in indices.tolist():
        path = folder / f"{i + 1:05d}.jpg"
        try:
            with Image.open(path) as image:
                frame = np.asarray(image.convert("RGB"))
        except FileNotFoundError:
            raise BadSampleError(f"missing frame: {path}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadSampleError(f"cannot decode frame {path}: {err}") from err
        if frames and frame.shape != frames[0].shape:
            raise BadSampleError(f"frame {path} is {frame.shape[:2]}, earlier frames are {frames[0].shape[:2]}")
        frames.append(frame)
    return np.stack(frames)


class _VideoFile:
    """A decord reader of one v2 video; errors become :class:`BadSampleError`."""

    def __init__(self, path: Path) -> None:
        from decord import DECORDError, VideoReader  # imported lazily: only v2 needs decord

        self.path, self._error = path, DECORDError
        if not path.is_file():
            raise BadSampleError(f"video missing: {path}")
        try:
            self._reader = VideoReader(str(path), num_threads=1)
            self.num_frames = len(self._reader)
        except (DECORDError, RuntimeError) as err:
            raise BadSampleError(f"cannot open video {path}: {err}") from err
        if self.num_frames < 1:
            raise BadSampleError(f"video has no frames: {path}")

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Decode 0-based frame ``indices`` -> ``uint8 (K, H, W, 3)``."""
        try:
            return self._reader.get_batch(indices.tolist()).asnumpy()
        except (self._error, RuntimeError) as err:
            raise BadSampleError(f"cannot decode video {self.path}: {err}") from err


# --------------------------------------------------------------------------- dataset
class SomethingSomethingDataset(Dataset[Sample | None]):
    """Clips of one split; ``__getitem__`` returns ``{"video", "label", "index"}`` or ``None``.

    Args:
        records: the split's videos.
        media: ``"frames"`` (v1 jpg folders) or ``"video"`` (v2 files).
        train: random TSN sampling + multi-scale crop + flip; else evaluation views.
        num_segments: frames per clip ``T``.
        crop_size: output side ``S``.
        short_side: evaluation resize of the short side (before the crop).
        scales: multi-scale crop scales (train).
        flip: random horizontal flip with left/right label swap (train).
        flip_map: label after a flip, per class (see :func:`flip_label_map`).
        num_clips, num_crops: evaluation views ``V = num_clips * num_crops``.
        bad_sample: ``"fail"`` raises :class:`BadSampleError`; ``"skip"`` warns and returns ``None``.
        seed: RNG seed in the main process; worker processes seed from their worker seed.

    ``video`` is ``(3, T, S, S)``, or ``(V, 3, T, S, S)`` for evaluation with ``V > 1``.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        media: Literal["frames", "video"],
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

    def _generator(self) -> torch.Generator:
        """This process's RNG: seeded from the worker seed in a worker, else from ``seed``."""
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._rng is None or self._rng_owner != owner:
            self._rng = torch.Generator().manual_seed(self.seed if info is None else info.seed)
            self._rng_owner = owner
        return self._rng

    def _read(self, record: VideoRecord, indices_for: Callable[[int], np.ndarray]) -> np.ndarray:
        """Frames at ``indices_for(num_frames)`` (any shape ``S``) -> ``uint8 (*S, H, W, 3)``."""
        video = _VideoFile(record.path) if self.media == "video" else None
        if video is not None:
            num_frames = video.num_frames
        else:
            num_frames = record.num_frames if record.num_frames is not None else count_frames(record.path)
        indices = indices_for(num_frames)
        unique, inverse = np.unique(indices, return_inverse=True)
        frames = video.read(unique) if video is not None else read_jpeg_frames(record.path, unique)
        return frames[inverse.reshape(indices.shape)]

    def __getitem__(self, index: int | tuple[int, int]) -> Sample | None:
        # (index, seed) from cakes.resume.ResumableSampler: this sample's augmentation is a pure
        # function of the seed (exact resume); a plain index uses the process generator
        index, sample_seed = index if isinstance(index, tuple) else (index, None)
        record = self.records[index]
        try:
            if self.train:
                rng = self._generator() if sample_seed is None else torch.Generator().manual_seed(sample_seed)
                frames = self._read(record, lambda n: sample_train_indices(n, self.num_segments, rng))
                video, flipped = train_transform(frames, self.crop_size, self.scales, self.flip, rng)
                label = self.flip_map[record.label] if flipped else record.label
            else:
                frames = self._read(record, lambda n: sample_eval_indices(n, self.num_segments, self.num_clips))
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


# --------------------------------------------------------------------------- datamodule
class SomethingSomethingDataModule(SplitDataModule):
    """Something-Something V1/V2 with TSN sampling and augmentation.

    Args:
        root: dataset folder (see the module docstring for the layout).
        version: ``"v1"`` (jpg frames) or ``"v2"`` (webm videos).
        list_format: ``"csv"`` or ``"trn"`` (v1), ``"json"`` (v2); ``None`` = the official one.
        media_dir, labels_file, train_file, val_file: paths relative to ``root`` (or
            absolute); ``None`` = the official names for ``version``/``list_format``.
        num_classes: expected number of classes (174 for both versions), checked against the
            labels file; ``None`` = whatever the labels file lists.
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
            (drop it, warn with :class:`BadSampleWarning`, count in ``batch["skipped"]``).
        balanced_batches: stratified training order: every class equally often in each batch
            (:func:`cakes.resume.stratified_permutation`). For few-class data: with 4 classes
            at batch 16, each batch's label imbalance otherwise dominates the classifier's gradient.

    ``class_names`` / ``num_classes`` read only the labels file, so they work before
    :meth:`setup` (to build the model). :meth:`validate` checks every file before training;
    :meth:`setup` parses the lists its stage needs. The test split is the published validation
    split.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        version: Version = "v1",
        list_format: ListFormat | None = None,
        media_dir: str | None = None,
        labels_file: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
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
        self.balanced_batches = bool(balanced_batches)
        if version not in DEFAULT_LIST_FORMAT:
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        fmt = list_format or DEFAULT_LIST_FORMAT[version]
        if (version, fmt) not in OFFICIAL_FILES:
            allowed = [f for v, f in OFFICIAL_FILES if v == version]
            raise ValueError(f"list_format for {version} must be one of {allowed}, got {fmt!r}")
        if bad_sample not in ("fail", "skip"):
            raise ValueError(f"bad_sample must be 'fail' or 'skip', got {bad_sample!r}")
        for field, value in [
            ("num_frames", num_frames),
            ("crop_size", crop_size),
            ("batch_size", batch_size),
            ("val_clips", val_clips),
            ("test_clips", test_clips),
        ]:
            if value < 1:
                raise ValueError(f"{field} must be positive, got {value}")
        for field, value in [("val_crops", val_crops), ("test_crops", test_crops)]:
            if value not in (1, 3):
                raise ValueError(f"{field} must be 1 or 3, got {value}")
        if test_short_side < crop_size:
            raise ValueError(f"test_short_side ({test_short_side}) must be >= crop_size ({crop_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not train_scales or not all(0 < float(s) <= 1 for s in train_scales):
            raise ValueError(f"train_scales must be non-empty fractions in (0, 1], got {list(train_scales)}")

        self.root = Path(root).expanduser()
        self.version, self.list_format = version, fmt
        default_media, default_labels, default_train, default_val = OFFICIAL_FILES[(version, fmt)]
        self.media_path = self._resolve(media_dir or default_media)
        self.labels_path = self._resolve(labels_file or default_labels)
        self.train_path = self._resolve(train_file or default_train)
        self.val_path = self._resolve(val_file or default_val)
        self.expected_num_classes = num_classes
        self.num_frames, self.crop_size, self.test_short_side = num_frames, crop_size, test_short_side
        self.train_scales = tuple(float(s) for s in train_scales)
        self.flip = flip
        self.val_views = (val_clips, val_crops)
        self.test_views = (test_clips, test_crops)
        self.batch_size, self.num_workers, self.bad_sample = batch_size, num_workers, bad_sample

        self._class_names: list[str] | None = None
        self.train_set: SomethingSomethingDataset | None = None
        self.val_set: SomethingSomethingDataset | None = None
        self.test_set: SomethingSomethingDataset | None = None

    def _resolve(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    # ----------------------------------------------------------------- classes
    def read_class_names(self) -> list[str]:
        """Read the sorted class names from the labels file (cheap; no split parsing)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Something-Something {self.version} root not found: {self.root}")
        if self.version == "v2":
            return read_v2_class_json(self.labels_path)
        return read_class_list(self.labels_path)

    @property
    def class_names(self) -> list[str]:
        """Alphabetically sorted class names; label ``i`` is ``class_names[i]``."""
        if self._class_names is None:
            self._class_names = self.read_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes (reads the labels file on first use)."""
        return len(self.class_names)

    # ----------------------------------------------------------------- setup
    def _load_classes(self) -> list[str]:
        """Re-read the labels file and check it against ``num_classes`` and earlier reads."""
        names = self.read_class_names()
        if self.expected_num_classes is not None and len(names) != self.expected_num_classes:
            raise ValueError(f"{self.labels_path}: {len(names)} classes, but num_classes={self.expected_num_classes}")
        if self._class_names is not None and names != self._class_names:
            raise ValueError(f"{self.labels_path}: class names differ from those read before (file changed?)")
        self._class_names = names
        if not self.media_path.is_dir():
            raise FileNotFoundError(f"Something-Something {self.version} media folder not found: {self.media_path}")
        return names

    def validate(self) -> None:
        """Check root, labels file, media folder and both split lists, before any model is built.

        Raises:
            FileNotFoundError: root, media folder, labels or split file missing (path named).
            ValueError: malformed line (file and line named), unknown class, bad label index,
                class count differing from ``num_classes``.
        """
        self._load_classes()
        self._parse(self.train_path)
        self._parse(self.val_path)

    def setup(self, stage: str | None = None) -> None:
        """Parse and validate the label and split files needed for ``stage`` (raises as :meth:`validate`)."""
        if stage not in (None, "fit", "validate", "test"):
            raise ValueError(f"unsupported stage {stage!r} (fit, validate or test)")
        names = self._load_classes()
        flip_map = flip_label_map(names)
        common: dict[str, Any] = {
            "media": "video" if self.version == "v2" else "frames",
            "num_segments": self.num_frames,
            "crop_size": self.crop_size,
            "short_side": self.test_short_side,
            "bad_sample": self.bad_sample,
        }
        if stage in (None, "fit"):
            train_records = self._parse(self.train_path)
            world_size = self.trainer.world_size if self.trainer is not None else 1
            if len(train_records) // world_size < self.batch_size:
                raise ValueError(
                    f"{self.train_path}: {len(train_records)} videos over {world_size} device(s) "
                    f"is less than one batch of batch_size={self.batch_size}"
                )
            self.train_set = SomethingSomethingDataset(
                train_records, train=True, scales=self.train_scales, flip=self.flip, flip_map=flip_map, **common
            )
        val_records = self._parse(self.val_path)  # the published validation split is the test split

        def eval_set(clips: int, crops: int) -> SomethingSomethingDataset:
            return SomethingSomethingDataset(val_records, train=False, num_clips=clips, num_crops=crops, **common)

        if stage in (None, "fit", "validate"):
            self.val_set = eval_set(*self.val_views)
        if stage in (None, "test"):
            self.test_set = eval_set(*self.test_views)

    def _parse(self, path: Path) -> list[VideoRecord]:
        if self.list_format == "csv":
            return parse_v1_csv(path, self.class_names, self.media_path)
        if self.list_format == "trn":
            return parse_trn_list(path, self.num_classes, self.media_path)
        return parse_v2_json(path, self.class_names, self.media_path)

    # ----------------------------------------------------------------- loaders
    def _seed(self) -> int:
        """Augmentation seed from the global torch seed, the rank and the epoch."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        state = np.random.SeedSequence([torch.initial_seed(), rank, epoch]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))

    def make_loader(self, dataset: SomethingSomethingDataset, train: bool) -> DataLoader:
        generator, sampler = None, None
        if train:
            dataset.seed = self._seed()
            generator = torch.Generator().manual_seed(dataset.seed)  # worker seeds
            # order and augmentation a pure function of (seed, epoch); starts at the resume point
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


class SyntheticSomethingSomethingDataModule(SomethingSomethingDataModule):
    """The v1 CSV loader on synthetic data generated into ``root`` by :meth:`prepare_data`.

    Args:
        root: dataset folder; generated if missing (see
            :func:`cakes.data.synthetic_video.generate_synthetic_ssv1`).
        num_classes, train_per_class, val_per_class, video_frames, height, width,
            generator_seed: generation parameters (``video_frames`` frames per video).
        **kwargs: loader arguments of :class:`SomethingSomethingDataModule` (``version`` and
            ``list_format`` are fixed to the official v1 CSV layout).

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
