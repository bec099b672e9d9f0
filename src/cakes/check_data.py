"""Check a dataset completely before (or instead of) training on it.

    python -m cakes.check_data <the same overrides as train.py / search.py> [--workers N]
    python -m cakes.check_data experiment=ssv1_c3d data.root=/datasets/ssv1
    python -m cakes.check_data experiment=msd_base data.root=/datasets/Task07_Pancreas

Composes the config (``train.yaml``; ``--config search`` for search recipes), instantiates the data
module, and checks every item it lists:

* video (Something-Something): labels file, class count against ``num_classes``, list / CSV / json
  format, label range; every listed frame folder exists, its frames are numbered without gaps
  (and as many as a TRN list says) and **every jpg decodes**, all of one size; v2 videos open and
  every frame decodes.
* volumes (MSD, NIH): the file list; every image and label file exists and reads completely
  (NIfTI, or a DICOM series); image and label agree in shape and affine; label values are
  integers in ``0..num_classes-1``; the split.

Prints a report with counts and every bad item by name; exits 1 if anything is bad (2 if the
config itself cannot be used). Nothing is written.

During training, ``data.bad_sample=skip`` drops unreadable videos instead of failing: each one is
named in a ``BadSampleWarning``, counted per epoch (``train/skipped_samples``) and printed per epoch
by :class:`BadSampleReport`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- report
@dataclass
class Section:
    """One part of the check (a split, the file list, ...): how many items, which are bad."""

    name: str
    items: int = 0
    units: dict[str, int] = field(default_factory=dict)  # e.g. {"frames": 1234}
    bad: list[tuple[str, str]] = field(default_factory=list)  # (item name, reason)


@dataclass
class Report:
    dataset: str
    sections: list[Section] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(len(s.bad) for s in self.sections)

    def section(self, name: str) -> Section:
        self.sections.append(Section(name))
        return self.sections[-1]

    def format(self) -> str:
        lines = [f"check_data: {self.dataset}"]
        for s in self.sections:
            units = "".join(f", {n} {unit}" for unit, n in s.units.items())
            lines.append(f"  {s.name}: {s.items} checked{units}, {len(s.bad)} bad")
            lines += [f"    BAD {s.name} {item}: {reason}" for item, reason in s.bad]
        verdict = "OK" if self.num_bad == 0 else f"FAILED: {self.num_bad} bad item(s)"
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


def _map(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterable[Any]:
    if workers <= 1 or len(items) < 2:
        return map(function, items)
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        return list(pool.imap(function, items, chunksize=max(1, min(64, len(items) // (8 * workers)))))
    finally:
        pool.close()
        pool.join()


# --------------------------------------------------------------------------- video
def check_frame_folder(args: tuple[str, str, int | None]) -> tuple[str, int, str | None]:
    """``(video id, frames decoded, problem or None)`` for a v1 jpg frame folder."""
    from PIL import Image

    from cakes.datamodules.something import BadSampleError, count_frames

    video_id, folder, listed = args
    try:
        found = count_frames(Path(folder))
    except BadSampleError as err:
        return video_id, 0, str(err)
    if listed is not None and listed > found:
        return video_id, 0, f"the list says {listed} frames, {folder} holds {found}"
    size = None
    for i in range(1, found + 1):
        path = Path(folder) / f"{i:05d}.jpg"
        try:
            with Image.open(path) as image:
                image.load()
                frame_size = image.size
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad frame
            return video_id, i - 1, f"cannot decode frame {path}: {err}"
        if size is None:
            size = frame_size
        elif frame_size != size:
            return video_id, i - 1, f"frame {path} is {frame_size}, earlier frames are {size}"
    return video_id, found, None


def check_video_file(args: tuple[str, str, int | None]) -> tuple[str, int, str | None]:
    """``(video id, frames decoded, problem or None)`` for a v2 video file (every frame decoded)."""
    from cakes.datamodules.something import BadSampleError, _VideoFile

    video_id, path, _ = args
    try:
        video = _VideoFile(Path(path))
        for start in range(0, video.num_frames, 64):
            video.read(np.arange(start, min(start + 64, video.num_frames)))
    except BadSampleError as err:
        return video_id, 0, str(err)
    return video_id, video.num_frames, None


def check_video_data(dm: Any, report: Report, workers: int) -> None:
    from cakes.datamodules.something import parse_trn_list, parse_v1_csv, parse_v2_json

    structure = report.section("lists")
    try:
        dm.validate()  # root, labels file, class count, media folder, both lists (format, classes, ids)
        names = dm.class_names
    except (OSError, ValueError) as err:
        structure.bad.append(("format", str(err)))
        return
    structure.items = 3
    structure.units = {"classes": len(names)}
    parse = {"csv": lambda p: parse_v1_csv(p, names, dm.media_path),
             "trn": lambda p: parse_trn_list(p, len(names), dm.media_path),
             "json": lambda p: parse_v2_json(p, names, dm.media_path)}[dm.list_format]
    check = check_video_file if dm.version == "v2" else check_frame_folder
    seen: dict[str, str] = {}
    for split, path in (("train", dm.train_path), ("val", dm.val_path)):
        section = report.section(split)
        records = parse(path)
        section.items = len(records)
        for rec in records:
            if not 0 <= rec.label < len(names):
                section.bad.append((repr(rec.video_id), f"label {rec.label} outside 0..{len(names) - 1}"))
            if rec.video_id in seen:
                section.bad.append((repr(rec.video_id), f"also listed in {seen[rec.video_id]}"))
            seen.setdefault(rec.video_id, split)
        decoded = 0
        jobs = [(r.video_id, str(r.path), r.num_frames) for r in records]
        for video_id, frames, problem in _map(check, jobs, workers):
            decoded += frames
            if problem:
                section.bad.append((repr(video_id), problem))
        section.units = {"frames decoded": decoded}


# --------------------------------------------------------------------------- volumes
def _read_volume(path: Path, reader: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z), affine)``: NIfTI read completely, or a DICOM series with ``reader``."""
    if path.is_dir():
        data, meta = reader.get_data(reader.read(str(path)))
        return np.asarray(data), np.asarray(meta["affine"])
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine)


def check_case(args: tuple[str, str, str, int, Any]) -> tuple[str, str | None]:
    """``(case id, problem or None)``: files read, grids agree, label values in ``0..K-1``."""
    from cakes.datamodules.volume_transforms import check_grids

    case, image_path, label_path, num_classes, reader = args
    arrays = {}
    for what, path in (("image", Path(image_path)), ("label", Path(label_path))):
        if not path.exists():
            return case, f"{what} not found: {path}"
        try:
            arrays[what] = _read_volume(path, reader)
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


def volume_cases(dm: Any) -> list[tuple[str, Path, Path]]:
    """Every listed case ``(id, image, label)`` — missing files included (they are checked later)."""
    from cakes.datamodules.msd import MSDDataModule, case_id
    from cakes.datamodules.nih import _LABEL, NIHPancreasDataModule
    from cakes.datamodules.volume import read_json

    if isinstance(dm, MSDDataModule):
        from monai.data import load_decathlon_datalist

        if not dm.root.is_dir():
            raise FileNotFoundError(f"MSD dataset root not found: {dm.root} (set data.root)")
        data = read_json(dm.dataset_json, "MSD dataset.json")
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, dict) or len(labels) != dm.num_classes:
            raise ValueError(f"{dm.dataset_json}: 'labels' {labels} does not list num_classes={dm.num_classes} classes")
        entries = data.get("training")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)
                for e in entries):
            raise ValueError(f"{dm.dataset_json}: 'training' must be a list of {{'image': path, 'label': path}}")
        datalist = load_decathlon_datalist(dm.dataset_json, True, "training", base_dir=dm.root)
        return [(case_id(e["image"]), Path(e["image"]), Path(e["label"])) for e in datalist]
    if isinstance(dm, NIHPancreasDataModule):
        for what, path in (("root", dm.root), ("image folder", dm.image_path), ("label folder", dm.label_path)):
            if not path.is_dir():
                raise FileNotFoundError(f"NIH Pancreas-CT {what} not found: {path}")
        cases = []
        for name in sorted(p.name for p in dm.label_path.iterdir() if not p.name.startswith(".")):
            match = _LABEL.match(name)
            if match and f"PANCREAS_{match.group(1)}" not in dm.exclude_cases:
                cases.append((f"PANCREAS_{match.group(1)}", dm._image_of(match.group(1)), dm.label_path / name))
        return cases
    return [(c.case, c.image, c.label) for c in dm.list_cases()]


def check_volume_data(dm: Any, report: Report, workers: int) -> None:
    structure = report.section("file list")
    try:
        cases = volume_cases(dm)
    except (OSError, ValueError) as err:
        structure.bad.append(("format", str(err)))
        return
    structure.items = len(cases)
    ids = [c[0] for c in cases]
    for dupe in sorted({i for i in ids if ids.count(i) > 1}):
        structure.bad.append((repr(dupe), "listed more than once"))
    section = report.section("cases")
    section.items = len(cases)
    reader = dm.image_reader if not isinstance(dm.image_reader, str) else None
    jobs = [(case, str(image), str(label), dm.num_classes, reader) for case, image, label in cases]
    for case, problem in _map(check_case, jobs, workers):
        if problem:
            section.bad.append((repr(case), problem))
    if not report.num_bad:
        split = report.section("split")
        try:
            resolved = dm.resolve_split()
            split.items = len(resolved["train"]) + len(resolved["val"])
            split.units = {"train": len(resolved["train"]), "val": len(resolved["val"])}
        except (OSError, ValueError) as err:
            split.bad.append(("split", str(err)))


# --------------------------------------------------------------------------- entry point
def check_datamodule(dm: pl.LightningDataModule, workers: int = 1) -> Report:
    """Check every item of a data module (see the module docstring)."""
    from cakes.datamodules.something import SomethingSomethingDataModule
    from cakes.datamodules.volume import VolumeDataModule

    report = Report(f"{type(dm).__name__} at {getattr(dm, 'root', '?')}")
    if hasattr(dm, "generation") and hasattr(dm, "prepare_data"):
        dm.prepare_data()  # synthetic sets: generated on first use, as a run would
    if isinstance(dm, SomethingSomethingDataModule):
        check_video_data(dm, report, workers)
    elif isinstance(dm, VolumeDataModule):
        check_volume_data(dm, report, workers)
    else:
        raise TypeError(f"check_data does not know {type(dm).__name__}")
    return report


def compose_data_config(overrides: Sequence[str], config: str | None = None) -> Any:
    """The run's config as ``train.py`` (or ``search.py``) would compose it, writing nothing."""
    from cakes.config import compose_config

    errors: list[Exception] = []
    for name in [config] if config else ["train", "search"]:
        try:
            cfg = compose_config(name, overrides)
            break
        except Exception as err:  # noqa: BLE001 - try the other entry point's config
            errors.append(err)
    else:
        raise errors[0]  # train.yaml's reason (or the one asked for)
    if "split_dir" in cfg.data:
        cfg.data.split_dir = None  # a check writes nothing
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cakes.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py / search.py")
    parser.add_argument("--config", choices=["train", "search"], default=None,
                        help="config to compose (default: train.yaml, else search.yaml)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding in parallel (default: min(8, CPUs))")
    args = parser.parse_intermixed_args(argv)
    from hydra.utils import instantiate

    from cakes.config import one_line
    from cakes.arch import check_arch

    try:
        cfg = compose_data_config(args.overrides, args.config)
        check_arch(cfg)  # as train.py would, before anything is built
        dm = instantiate(cfg.data)
    except Exception as err:  # noqa: BLE001 - a config that cannot be used is its own exit status
        print(f"check_data: cannot build the data module: {one_line(err)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        report = check_datamodule(dm, workers=args.workers)
    except Exception as err:  # noqa: BLE001 - one line, no traceback
        print(f"check_data: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(report.format(), flush=True)
    return 1 if report.num_bad else 0


# --------------------------------------------------------------------------- during training
class BadSampleReport(pl.Callback):
    """Prints, after every training epoch, how many samples ``data.bad_sample=skip`` dropped (summed
    over ranks); each one is named in a ``BadSampleWarning`` where it was read. Silent when none."""

    def __init__(self) -> None:
        self._skipped = 0
        self.history: list[tuple[int, int]] = []  # (epoch, skipped)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._skipped = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if isinstance(batch, dict):
            self._skipped += int(batch.get("skipped", 0))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(self._skipped), device=pl_module.device),
                                        reduce_op="sum")
        skipped = int(round(float(total)))
        self.history.append((trainer.current_epoch, skipped))
        if skipped and trainer.is_global_zero:
            message = (f"epoch {trainer.current_epoch}: skipped {skipped} unreadable training sample(s) "
                       "(data.bad_sample=skip; each is named in a BadSampleWarning; "
                       "python -m cakes.check_data <overrides> lists them all)")
            log.warning(message)
            print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
