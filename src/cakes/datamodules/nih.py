"""NIH Pancreas-CT (TCIA): 82 (now 80) contrast-enhanced CTs, binary pancreas labels, 4-fold
cross-validation by case id.

Layout under ``root`` (folder names are arguments)::

    images/PANCREAS_0001/…/*.dcm      a DICOM series (any nesting; one series per case), or
    images/PANCREAS_0001.nii.gz       the same converted to NIfTI (image_format="nifti")
    labels/label0001.nii.gz           binary pancreas

Cases are the label files ``label<NNNN>.nii.gz`` (hidden ``._*`` files ignored); case id
``PANCREAS_<NNNN>``. DICOM slices are ordered by their position along the slice normal
(``ImagePositionPatient``), never by file name or instance number; reading DICOM needs ``pydicom``.
Every label must sit on its image's grid (shape and affine, checked when loaded), so an axis flip
in a conversion is an error naming the case, not a silent misalignment. Folds: the sorted case ids
shuffled with ``split_seed`` and dealt round-robin into ``num_folds`` folds; ``fold`` is held out
(validation = test) and the rest trains. The folds are written to the run directory as
``folds.json`` and reused with ``split_file=…``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from cakes.datamodules.volume import Case, VolumeDataModule

_LABEL = re.compile(r"^label(\d{4})\.nii(\.gz)?$")
IMAGE_FORMATS = ("dicom", "nifti")


class DicomSeriesReader(ImageReader):
    """MONAI reader of one DICOM series folder → ``(X, Y, Z)`` HU array with a RAS affine.

    Slices are sorted by ``ImagePositionPatient`` projected on the slice normal; a folder holding
    several series, or slices of different orientation or size, is an error naming the folder.
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return all(Path(f).is_dir() for f in ([filename] if isinstance(filename, (str, os.PathLike)) else filename))

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> list[Any]:
        import pydicom

        folder = Path(data if isinstance(data, (str, os.PathLike)) else data[0])
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        slices = [pydicom.dcmread(str(p)) for p in files if p.suffix.lower() in (".dcm", "")]
        if not slices:
            raise ValueError(f"{folder}: no DICOM files")
        series = {str(s.SeriesInstanceUID) for s in slices}
        if len(series) > 1:
            raise ValueError(f"{folder}: {len(series)} DICOM series found, expected one")
        return [(folder, slices)]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        folder, slices = img[0]
        orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
        row, col = orientation[:3], orientation[3:]
        normal = np.cross(row, col)
        if any(not np.allclose(s.ImageOrientationPatient, orientation, atol=1e-4) for s in slices):
            raise ValueError(f"{folder}: slices have different orientations")
        slices = sorted(slices, key=lambda s: float(np.dot(np.array(s.ImagePositionPatient, dtype=float), normal)))
        planes = [
            s.pixel_array.astype(np.float32) * float(getattr(s, "RescaleSlope", 1))
            + float(getattr(s, "RescaleIntercept", 0))
            for s in slices
        ]
        if len({p.shape for p in planes}) != 1:
            raise ValueError(f"{folder}: slices have different sizes {sorted({p.shape for p in planes})}")
        volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (cols, rows, k)
        first = np.array(slices[0].ImagePositionPatient, dtype=float)
        if len(slices) > 1:
            step = (np.array(slices[-1].ImagePositionPatient, dtype=float) - first) / (len(slices) - 1)
        else:
            step = normal * float(getattr(slices[0], "SliceThickness", 1.0))
        row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * col_spacing, col * row_spacing, step, first
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "filename_or_obj": str(folder),
        }
        return volume, meta


class NIHPancreasDataModule(VolumeDataModule):
    """NIH Pancreas-CT with 4-fold cross-validation; see the module docstring and
    :class:`~cakes.datamodules.volume.VolumeDataModule` for the shared arguments.

    Args:
        image_dir, label_dir: folders under ``root``.
        image_format: ``"dicom"`` (series folders ``PANCREAS_NNNN``) or ``"nifti"`` (``PANCREAS_NNNN.nii.gz``).
        num_folds, fold: cross-validation folds and the held-out one (``0..num_folds-1``).
        exclude_cases: case ids left out on purpose (e.g. known duplicates); logged in the split.
    """

    dataset_name = "nih_pancreas_ct"
    split_filename = "folds.json"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_dir: str = "images",
        label_dir: str = "labels",
        image_format: str = "dicom",
        num_folds: int = 4,
        fold: int = 0,
        exclude_cases: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if num_folds < 2 or not 0 <= fold < num_folds:
            raise ValueError(f"need num_folds >= 2 and 0 <= fold < num_folds, got fold={fold}, num_folds={num_folds}")
        self.image_path, self.label_path = self.root / image_dir, self.root / label_dir
        self.image_format, self.num_folds, self.fold = image_format, int(num_folds), int(fold)
        self.exclude_cases = [str(c) for c in exclude_cases]
        self.image_reader = DicomSeriesReader() if image_format == "dicom" else "NibabelReader"

    def _image_of(self, number: str) -> Path:
        """The image of case ``PANCREAS_<number>``: its DICOM series folder or its NIfTI file."""
        stem = self.image_path / f"PANCREAS_{number}"
        if self.image_format == "dicom":
            return stem
        plain = stem.with_name(stem.name + ".nii")
        return plain if plain.is_file() else stem.with_name(stem.name + ".nii.gz")

    def _label_file_names(self) -> list[str]:
        """Sorted names in the label folder (hidden ``._*`` files left out); the folders must exist."""
        for what, path in (
            ("NIH Pancreas-CT root", self.root),
            ("image folder", self.image_path),
            ("label folder", self.label_path),
        ):
            if not path.is_dir():
                raise FileNotFoundError(f"{what} not found: {path} (set data.root / data.image_dir / data.label_dir)")
        return sorted(p.name for p in self.label_path.iterdir() if not p.name.startswith("."))

    def _labelled_cases(self, names: list[str]) -> list[Case]:
        """A case per ``label<NNNN>.nii[.gz]`` of ``names``, excluded cases included."""
        matches = [m for m in map(_LABEL.match, names) if m is not None]
        return [
            Case(f"PANCREAS_{m.group(1)}", self._image_of(m.group(1)), self.label_path / m.group(0)) for m in matches
        ]

    def listed_cases(self) -> list[Case]:
        """Every labelled case not in ``exclude_cases``, its image unchecked."""
        excluded = set(self.exclude_cases)
        return [c for c in self._labelled_cases(self._label_file_names()) if c.case not in excluded]

    def list_cases(self) -> list[Case]:
        names = self._label_file_names()
        if self.image_format == "dicom":
            try:
                import pydicom  # noqa: F401
            except ImportError:
                raise ImportError(
                    "reading NIH DICOM series needs pydicom (pip install pydicom), or convert the "
                    "images to NIfTI and set data.image_format=nifti"
                ) from None
        unexpected = [n for n in names if not _LABEL.match(n)]
        if unexpected:
            warnings.warn(
                f"{self.label_path}: ignoring files not named label<NNNN>.nii.gz: {unexpected[:10]}", stacklevel=2
            )
        labelled = self._labelled_cases(names)
        excluded = set(self.exclude_cases)
        cases = [c for c in labelled if c.case not in excluded]
        for case in cases:
            exists = case.image.is_dir() if self.image_format == "dicom" else case.image.is_file()
            if not exists:
                raise FileNotFoundError(f"case {case.case!r}: image not found: {case.image} (label {case.label})")
        unknown = excluded - {c.case for c in labelled}
        if unknown:
            raise ValueError(f"exclude_cases {sorted(unknown)} are not cases of {self.label_path}")
        used_images = {c.image.name for c in cases}
        unlabelled = sorted(
            p.name for p in self.image_path.iterdir() if p.name.startswith("PANCREAS_") and p.name not in used_images
        )
        if unlabelled:
            warnings.warn(
                f"{self.image_path}: images without a label file are not used: {unlabelled[:10]}", stacklevel=2
            )
        return cases

    def make_split(self, case_ids: list[str]) -> dict[str, Any]:
        if len(case_ids) < self.num_folds:
            raise ValueError(f"{len(case_ids)} cases cannot make {self.num_folds} folds")
        order = np.random.default_rng(self.split_seed).permutation(sorted(case_ids)).tolist()
        folds = [sorted(order[k :: self.num_folds]) for k in range(self.num_folds)]
        return self._fold_split(folds, {"seed": self.split_seed, "excluded": self.exclude_cases})

    def split_from_file(self, data: Mapping[str, Any], path: Path) -> dict[str, Any]:
        folds = data.get("folds") if isinstance(data, Mapping) else None
        if not isinstance(folds, list) or len(folds) != self.num_folds or not all(isinstance(f, list) for f in folds):
            raise ValueError(f"{path}: expected 'folds': a list of {self.num_folds} lists of case ids")
        return self._fold_split(folds, {k: v for k, v in data.items() if k not in ("folds", "fold", "train", "val")})

    def _fold_split(self, folds: list[list[str]], extra: dict[str, Any]) -> dict[str, Any]:
        train = sorted(c for k, f in enumerate(folds) if k != self.fold for c in f)
        return {"folds": folds, "fold": self.fold, "train": train, "val": list(folds[self.fold]), **extra}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "fold": f"{self.fold}/{self.num_folds}"}
