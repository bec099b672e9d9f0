"""What the CT segmentation data modules share: case lists checked at setup, a train/val split by
case id that is written to the run directory (and can be given back), MONAI pipelines, caching,
loaders and the evaluation protocol they report.

Train batches (``list_data_collate``)::

    image: float (B, 1, D, H, W)   B = batch_size = volumes per step × crops_per_volume
    label: long  (B, 1, D, H, W)

Validation / test batches (one whole volume on the ``spacing`` grid)::

    image: MetaTensor float (1, 1, D, H, W)   .affine (1, 4, 4), .meta["filename_or_obj"]
    label: MetaTensor long  (1, 1, D, H, W)
    original_label: MetaTensor long (1, 1, X, Y, Z)   the label as stored (eval_space="original")
    case: [case id]    index: long (1,)  position of the case in the split (DDP dedup key)

The held-out split serves as both validation and test set (MSD's own test images have no labels).

Training order and augmentation are a pure function of ``(seed, epoch, case)``
(:class:`~cakes.sampler.ResumableSampler` + :class:`SeededSamples`), so a run resumed mid-epoch
continues with exactly the crops an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset

from cakes.datamodules.base import SplitDataModule
from cakes.datamodules.checks import Section, map_items
from cakes.datamodules.volume_transforms import check_grids, eval_transforms, train_transforms
from cakes.sampler import train_sampler

EVAL_SPACES = ("original", "resampled")


@dataclass(frozen=True)
class Case:
    """One labelled volume: id, image (NIfTI file or DICOM series folder), label (NIfTI)."""

    case: str
    image: Path
    label: Path


def write_json_atomic(path: Path, data: Any) -> None:
    from cakes.files import write_atomic

    write_atomic(path, json.dumps(data, indent=2) + "\n")


def nifti_problem(path: Path, image: Any) -> str | None:
    """Why a NIfTI file whose header reads cannot be complete, found cheaply (``None`` if nothing).

    The header says how many bytes the file holds (``vox_offset`` + voxels x bytes per voxel). An
    uncompressed file must be that long; a ``.gz`` file ends with the size of its content (gzip's
    ISIZE, mod 2**32), so a truncated one almost never matches — and only then is the file
    decompressed, to tell a truncated file (it ends early) from a valid one written differently
    (several gzip members, trailing bytes)."""
    import gzip
    import zlib

    try:
        header = image.header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * int(
            header.get_data_dtype().itemsize
        )
    except Exception:  # noqa: BLE001 - not a format with this layout: nothing to check cheaply
        return None
    if path.name.endswith(".gz"):
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < 18:
                return "truncated: shorter than a gzip header and trailer"
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return None
        try:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 24):
                    pass
        except (EOFError, OSError, zlib.error) as err:
            return f"truncated or corrupt: the header reads, the voxel data does not ({type(err).__name__}: {err})"
        return None
    if path.name.endswith(".nii") and path.stat().st_size < expected:
        return f"truncated: {path.stat().st_size} bytes, the header describes {expected}"
    return None


def case_error(record: Mapping[str, Any], err: BaseException) -> CaseError:
    """``err`` raised while loading the case of ``record``, as a :class:`CaseError` that names the
    case and its files (MONAI wraps the reader's error in "applying transform ...")."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    case = record.get("case", "?")
    message = " ".join(str(root).split())
    if not message.startswith(f"case {case!r}"):
        message = (
            f"case {case!r} (image {record.get('image')}, label {record.get('label')}): "
            f"{type(root).__name__}: {message}"
        )
    return CaseError(message)


class CaseError(RuntimeError):
    """Loading one case failed; the message names the case and its image and label files."""


class NamedCaseDataset(Dataset):
    """MONAI's ``Dataset`` whose loading errors name the case and its files (:func:`case_error`)."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:  # noqa: BLE001 - re-raised with the case named
            raise case_error(self.data[index], err) from err


class NamedCaseCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` whose loading errors (caching included) name the case and its files."""

    def _load_cache_item(self, idx: int) -> Any:
        try:
            return super()._load_cache_item(idx)
        except Exception as err:  # noqa: BLE001
            raise case_error(self.data[idx], err) from err

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:  # noqa: BLE001
            raise case_error(self.data[index], err) from err


def read_volume_completely(path: Path, reader: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z), affine (4, 4))``: a NIfTI file read completely, or a DICOM series folder with
    ``reader`` (a MONAI ``ImageReader``)."""
    if path.is_dir():
        data, meta = reader.get_data(reader.read(str(path)))
        return np.asarray(data), np.asarray(meta["affine"])
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine)


def check_case(job: tuple[str, str, str, int, Any]) -> tuple[str, str | None]:
    """``(case id, image, label, num_classes, reader)`` -> ``(case id, problem or None)``: both files read
    completely, their grids agree, label values are integers in ``0..num_classes-1``."""
    case, image_path, label_path, num_classes, reader = job
    arrays = {}
    for what, path in (("image", Path(image_path)), ("label", Path(label_path))):
        if not path.exists():
            return case, f"{what} not found: {path}"
        try:
            arrays[what] = read_volume_completely(path, reader)
        except Exception as err:  # noqa: BLE001 - any reader failure makes the case unusable
            return case, f"cannot read {what} {path}: {type(err).__name__}: {err}"
    (image, image_affine), (label, label_affine) = arrays["image"], arrays["label"]
    try:
        check_grids(case, image.shape[:3], image_affine, label.shape[:3], label_affine)
    except ValueError as err:
        return case, str(err).replace("\n", " ")
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
    if bad.size:
        return case, f"label {label_path} holds values {bad.tolist()[:5]} outside 0..{num_classes - 1}"
    return case, None


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None


class SeededSamples(torch.utils.data.Dataset):
    """A MONAI dataset read with the ``(index, seed)`` pairs of a
    :class:`~cakes.sampler.ResumableSampler`: the random transforms are seeded from the pair before
    each sample, so its crops and flips do not depend on the worker, the order or a resume."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        self.dataset.transform.set_random_state(seed=seed % 2**32)
        return self.dataset[index]


def check_grid_arguments(
    num_classes: int, spacing: Sequence[float], window: Sequence[float], patch_size: Sequence[int]
) -> None:
    """Raise ``ValueError`` for a class count, voxel size, HU window or patch size out of range."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive voxel sizes (mm), got {list(spacing)}")
    if len(window) != 2 or float(window[0]) >= float(window[1]):
        raise ValueError(f"window must be [lo, hi] HU with lo < hi, got {list(window)}")
    if len(patch_size) != 3 or min(int(s) for s in patch_size) < 1:
        raise ValueError(f"patch_size must be 3 positive sizes, got {list(patch_size)}")


def check_crop_arguments(
    crops_per_volume: int,
    batch_size: int,
    crop_pos: float,
    crop_neg: float,
    flip_axes: Sequence[int],
    rotate_planes: Sequence[Sequence[int]],
    patch_size: Sequence[int],
) -> None:
    """Raise ``ValueError`` for training crop and augmentation settings that cannot work together."""
    if crops_per_volume < 1 or batch_size % crops_per_volume:
        raise ValueError(f"crops_per_volume ({crops_per_volume}) must be >= 1 and divide batch_size ({batch_size})")
    if crop_pos < 0 or crop_neg < 0 or crop_pos + crop_neg == 0:
        raise ValueError(f"crop_pos / crop_neg must be >= 0 and not both 0, got {crop_pos} / {crop_neg}")
    if any(int(a) not in (0, 1, 2) for a in flip_axes):
        raise ValueError(f"flip_axes must be among 0, 1, 2, got {list(flip_axes)}")
    patch = [int(s) for s in patch_size]
    for plane in ([int(a) for a in p] for p in rotate_planes):
        if len(plane) != 2 or len(set(plane)) != 2 or any(a not in (0, 1, 2) for a in plane):
            raise ValueError(f"rotate_planes entries must be two distinct axes of 0, 1, 2, got {plane}")
        if patch[plane[0]] != patch[plane[1]]:
            raise ValueError(f"a 90° rotation in plane {plane} needs equal patch sizes there, got patch_size {patch}")


def check_loading_arguments(
    eval_space: str, cache_rate: float, num_workers: int, regions: Mapping[str, Sequence[int]], num_classes: int
) -> None:
    """Raise ``ValueError`` for an unknown evaluation space, cache rate, worker count or bad regions."""
    if eval_space not in EVAL_SPACES:
        raise ValueError(f"eval_space must be one of {EVAL_SPACES}, got {eval_space!r}")
    if not 0.0 <= cache_rate <= 1.0:
        raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    bad_regions = {k: v for k, v in regions.items() if not v or any(not 0 < x < num_classes for x in v)}
    if not regions or bad_regions:
        raise ValueError(f"regions must map names to foreground labels in 1..{num_classes - 1}, got {dict(regions)}")


class VolumeDataModule(SplitDataModule):
    """Base of :class:`~cakes.datamodules.msd.MSDDataModule` and
    :class:`~cakes.datamodules.nih.NIHPancreasDataModule`.

    Subclasses implement :meth:`listed_cases` (the file list as it stands), :meth:`list_cases` (the
    same, every file checked to exist; errors name the case and file), :meth:`make_split` and
    :meth:`split_from_file`.

    Args:
        root: dataset folder.
        num_classes: label values ``0..num_classes-1`` (background included); checked on every label.
        regions: DSC convention ``{name: [labels counted as foreground]}`` (reported in the protocol;
            the module reads it from the config).
        spacing: target voxel size (mm) along the RAS axes.
        window: HU window ``[lo, hi]`` mapped to ``[0, 1]`` with clipping.
        patch_size: training crop (voxels).
        crops_per_volume: random crops drawn from each loaded volume; divides ``batch_size``.
        crop_pos, crop_neg: ratio of foreground- to background-centred crops.
        flip_axes, rotate_planes: augmentation axes (random flip / 90° rotation, each p = 0.5).
        eval_space: score on the label as stored (``original``: predictions resampled back,
            nearest) or on the ``spacing`` grid (``resampled``).
        batch_size: training patches per device and step.
        num_workers: DataLoader workers per device.
        cache_rate: fraction of volumes whose loaded, resampled, windowed arrays are cached in memory.
        split_file: a split written by an earlier run (reused as is); ``None`` = make one.
        split_dir: where the split used is written (the run directory); ``None`` = not written.
        split_seed: seed of the split.
    """

    dataset_name = "volumes"
    split_filename = "split.json"
    image_reader = "NibabelReader"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        num_classes: int,
        regions: Mapping[str, Sequence[int]],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        window: Sequence[float] = (-100.0, 240.0),
        patch_size: Sequence[int] = (96, 96, 96),
        crops_per_volume: int = 1,
        crop_pos: float = 1.0,
        crop_neg: float = 1.0,
        flip_axes: Sequence[int] = (0, 1, 2),
        rotate_planes: Sequence[Sequence[int]] = ((0, 1), (0, 2), (1, 2)),
        eval_space: str = "original",
        batch_size: int = 2,
        num_workers: int = 4,
        cache_rate: float = 0.0,
        split_file: str | os.PathLike[str] | None = None,
        split_dir: str | os.PathLike[str] | None = None,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.spacing = tuple(float(s) for s in spacing)
        self.window = tuple(float(w) for w in window)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.rotate_planes = tuple(tuple(int(a) for a in plane) for plane in rotate_planes)
        self.regions = {str(k): [int(v) for v in labels] for k, labels in regions.items()}
        check_grid_arguments(num_classes, spacing, window, patch_size)
        check_crop_arguments(crops_per_volume, batch_size, crop_pos, crop_neg, flip_axes, rotate_planes, patch_size)
        check_loading_arguments(eval_space, cache_rate, num_workers, self.regions, num_classes)
        self.num_classes = int(num_classes)
        self.crops_per_volume, self.crop_pos, self.crop_neg = int(crops_per_volume), float(crop_pos), float(crop_neg)
        self.eval_space = eval_space
        self.batch_size, self.num_workers, self.cache_rate = int(batch_size), int(num_workers), float(cache_rate)
        self.split_file = Path(split_file).expanduser() if split_file else None
        self.split_dir = Path(split_dir).expanduser() if split_dir else None
        self.split_seed = int(split_seed)
        self._cases: list[Case] | None = None
        self.split: dict[str, Any] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ----------------------------------------------------------------- subclass hooks
    def listed_cases(self) -> list[Case]:
        """Every case the file list names, in a fixed order, its files not checked (``check_items``
        reports each missing one); raises naming the list file if the list itself is unusable."""
        raise NotImplementedError

    def list_cases(self) -> list[Case]:
        """Every labelled case, in a fixed order; raises naming the missing file or bad entry."""
        raise NotImplementedError

    def make_split(self, case_ids: list[str]) -> dict[str, Any]:
        """A new split ``{"train": [...], "val": [...], ...provenance}`` of ``case_ids``."""
        raise NotImplementedError

    def split_from_file(self, data: Mapping[str, Any], path: Path) -> dict[str, Any]:
        """The split to use from the content of a given split file (default: its train/val lists)."""
        return dict(data)

    # ----------------------------------------------------------------- checks
    @property
    def cases(self) -> list[Case]:
        if self._cases is None:
            cases = self.list_cases()
            ids = [c.case for c in cases]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"{self.dataset_name} at {self.root}: duplicate case ids {dupes}")
            if not cases:
                raise ValueError(f"{self.dataset_name} at {self.root}: no labelled cases")
            self._cases = cases
        return self._cases

    def validate(self) -> None:
        """Check the dataset before any model is built: the file list (every listed file must exist),
        that each label is on its image's grid (NIfTI headers: shape and affine), that no NIfTI file
        is truncated (:func:`nifti_problem`, cheap) and the split.

        Raises:
            FileNotFoundError: root, list file or a listed file missing (case and path named).
            ValueError: malformed list, image/label shape or affine mismatch (case named), bad split.
        """
        import nibabel as nib

        for case in self.cases:
            loaded = {}
            for what, path in (("image", case.image), ("label", case.label)):
                if path.is_dir():
                    continue  # a DICOM series: its grid is checked when loaded (CheckPaird)
                try:
                    loaded[what] = nib.load(str(path))
                except Exception as err:  # noqa: BLE001 - any reader failure makes the case unusable
                    raise ValueError(
                        f"case {case.case!r}: cannot read the {what} {path}: {type(err).__name__}: {err}"
                    ) from None
                problem = nifti_problem(path, loaded[what])
                if problem:
                    raise ValueError(f"case {case.case!r}: {what} {path}: {problem}")
            if len(loaded) == 2:
                image, label = loaded["image"], loaded["label"]
                check_grids(case.case, image.shape[:3], image.affine, label.shape[:3], label.affine)
        self.resolve_split()

    def check_items(self, workers: int = 1) -> list[Section]:
        """Check every listed case completely (``python -m cakes.check_data``), reading each volume in
        ``workers`` processes: ``file list`` (duplicates), ``cases`` (:func:`check_case`), and, if all
        is well, ``split``."""
        file_list = Section("file list")
        try:
            cases = self.listed_cases()
        except (OSError, ValueError) as err:
            file_list.bad.append(("format", str(err)))
            return [file_list]
        file_list.items = len(cases)
        ids = [c.case for c in cases]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        file_list.bad += [(repr(dupe), "listed more than once") for dupe in duplicates]
        checked = Section("cases", items=len(cases))
        reader = self.image_reader if not isinstance(self.image_reader, str) else None
        jobs = [(c.case, str(c.image), str(c.label), self.num_classes, reader) for c in cases]
        checked.bad += [(repr(case), problem) for case, problem in map_items(check_case, jobs, workers) if problem]
        sections = [file_list, checked]
        if not file_list.bad and not checked.bad:
            split = Section("split")
            try:
                resolved = self.resolve_split()
                split.items = len(resolved["train"]) + len(resolved["val"])
                split.units = {"train": len(resolved["train"]), "val": len(resolved["val"])}
            except (OSError, ValueError) as err:
                split.bad.append(("split", str(err)))
            sections.append(split)
        return sections

    def resolve_split(self) -> dict[str, Any]:
        """The split in use (given file or a new one), checked against the case list."""
        if self.split is not None:
            return self.split
        ids = [c.case for c in self.cases]
        if self.split_file is not None:
            split = self.split_from_file(read_json(self.split_file, "split file"), self.split_file)
            source = str(self.split_file)
        else:
            split = self.make_split(ids)
            source = "new"
        known = set(ids)
        for part in ("train", "val"):
            if not isinstance(split.get(part), list) or not split[part]:
                raise ValueError(f"split ({source}): {part!r} must be a non-empty list of case ids")
            unknown = [c for c in split[part] if c not in known]
            if unknown:
                raise ValueError(f"split ({source}): {part} cases {unknown[:10]} are not in the dataset at {self.root}")
        overlap = sorted(set(split["train"]) & set(split["val"]))
        if overlap:
            raise ValueError(f"split ({source}): cases {overlap[:10]} are in both train and val")
        self.split = {**split, "source": source}
        return self.split

    def protocol(self) -> dict[str, Any]:
        """The data half of the evaluation protocol (logged with every result)."""
        split = self.resolve_split()
        return {
            "dataset": self.dataset_name,
            "root": str(self.root),
            "spacing_mm": list(self.spacing),
            "window_hu": list(self.window),
            "orientation": "RAS",
            "eval_space": self.eval_space,
            "split": split["source"],
            "train_cases": len(split["train"]),
            "eval_cases": len(split["val"]),
        }

    # ----------------------------------------------------------------- datasets
    def _records(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        by_id = {c.case: c for c in self.cases}
        return [
            {"case": i, "index": k, "image": str(by_id[i].image), "label": str(by_id[i].label)}
            for k, i in enumerate(ids)
        ]

    def _dataset(self, records: list[dict[str, Any]], transform: Any) -> Dataset:
        if self.cache_rate > 0:
            return NamedCaseCacheDataset(
                records, transform, cache_rate=self.cache_rate, num_workers=self.num_workers or None, progress=False
            )
        return NamedCaseDataset(records, transform)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage``; writes the split to ``split_dir`` (global rank zero)."""
        split = self.resolve_split()
        if self.split_dir is not None and (self.trainer is None or self.trainer.is_global_zero):
            write_json_atomic(self.split_dir / self.split_filename, {k: v for k, v in split.items() if k != "source"})
        common = {
            "num_classes": self.num_classes,
            "spacing": self.spacing,
            "window": self.window,
            "image_reader": self.image_reader,
        }
        if stage in (None, "fit"):
            world = self.trainer.world_size if self.trainer is not None else 1
            volumes = self.batch_size // self.crops_per_volume
            if len(split["train"]) // world < volumes:
                raise ValueError(
                    f"{len(split['train'])} training cases over {world} device(s) are fewer than one "
                    f"batch of {volumes} volumes (batch_size {self.batch_size} / crops_per_volume "
                    f"{self.crops_per_volume})"
                )
            self.train_set = self._dataset(
                self._records(split["train"]),
                train_transforms(
                    patch_size=self.patch_size,
                    crops_per_volume=self.crops_per_volume,
                    pos=self.crop_pos,
                    neg=self.crop_neg,
                    flip_axes=self.flip_axes,
                    rotate_planes=self.rotate_planes,
                    **common,
                ),
            )
        if stage in (None, "fit", "validate", "test"):
            evaluation = eval_transforms(keep_original_label=self.eval_space == "original", **common)
            self.val_set = self._dataset(self._records(split["val"]), evaluation)
            self.test_set = self.val_set

    def make_loader(self, dataset: Dataset, train: bool) -> DataLoader:
        volumes = self.batch_size // self.crops_per_volume if train else 1
        sampler = None
        if train:  # order and crops a pure function of (seed, epoch, case); starts at the resume point
            sampler = train_sampler(dataset, self.trainer, batch_size=volumes, with_seeds=True)
            dataset = SeededSamples(dataset)
        return DataLoader(  # MONAI's: list_data_collate
            dataset,
            batch_size=volumes,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
