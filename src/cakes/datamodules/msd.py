"""Medical Segmentation Decathlon Task07_Pancreas (and the built-in synthetic look-alike).

Layout under ``root``: ``dataset.json``, ``imagesTr/pancreas_XXX.nii.gz``, ``labelsTr/…``. The file list
is read from dataset.json (``training`` entries; never globbed, so stray macOS ``._*`` files are ignored);
the case id is the image file name without ``.nii.gz``. Labels 0 background, 1 pancreas, 2 tumour.
The CAKES protocol holds out 20 % of the cases (226 train / 56 test of 282); the split, made from
``split_seed``, is written to the run directory as ``split.json`` and reused with ``split_file=…``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from cakes.data.synthetic_volume import generate_synthetic_msd
from cakes.datamodules.checks import Section
from cakes.datamodules.volume import Case, VolumeDataModule, read_json


def case_id(path: str | os.PathLike[str]) -> str:
    """``…/pancreas_290.nii.gz`` → ``pancreas_290``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class MSDDataModule(VolumeDataModule):
    """MSD Task07_Pancreas; see the module docstring and :class:`VolumeDataModule` for the shared
    arguments and batch layout.

    Args:
        dataset_json: the file list, relative to ``root``.
        val_fraction: held-out fraction of the cases (validation = test split) for a new split.
    """

    dataset_name = "msd_task07_pancreas"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dataset_json: str = "dataset.json",
        val_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.dataset_json = self.root / dataset_json
        self.val_fraction = float(val_fraction)

    def listed_cases(self) -> list[Case]:
        """The ``training`` entries of dataset.json (checked against ``num_classes``), files unchecked."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"MSD dataset root not found: {self.root} (set data.root)")
        data = read_json(self.dataset_json, "MSD dataset.json")
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, dict) or len(labels) != self.num_classes:
            raise ValueError(
                f"{self.dataset_json}: 'labels' {labels} does not list num_classes={self.num_classes} classes"
            )
        if not isinstance(data.get("training"), list):
            raise ValueError(f"{self.dataset_json}: no 'training' list")
        for k, entry in enumerate(data["training"]):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("image"), str)
                or not isinstance(entry.get("label"), str)
            ):
                raise ValueError(
                    f"{self.dataset_json}: training[{k}] must be {{'image': path, 'label': path}}, got {entry!r}"
                )
        datalist = load_decathlon_datalist(self.dataset_json, True, "training", base_dir=self.root)
        return [Case(case_id(entry["image"]), Path(entry["image"]), Path(entry["label"])) for entry in datalist]

    def list_cases(self) -> list[Case]:
        cases = self.listed_cases()
        for case in cases:
            for what, path in (("image", case.image), ("label", case.label)):
                if not path.is_file():
                    raise FileNotFoundError(
                        f"case {case.case!r}: {what} listed in {self.dataset_json} not found: {path}"
                    )
        return cases

    def make_split(self, case_ids: list[str]) -> dict[str, Any]:
        order = np.random.default_rng(self.split_seed).permutation(sorted(case_ids)).tolist()
        n_val = max(1, round(len(order) * self.val_fraction))
        if n_val >= len(order):
            raise ValueError(f"{len(order)} cases cannot be split with val_fraction={self.val_fraction}")
        return {
            "train": sorted(order[n_val:]),
            "val": sorted(order[:n_val]),
            "seed": self.split_seed,
            "val_fraction": self.val_fraction,
        }


class SyntheticMSDDataModule(MSDDataModule):
    """The MSD loader on synthetic Task07-like data generated into ``root`` on first use
    (see :func:`cakes.data.synthetic_volume.generate_synthetic_msd`).

    Args:
        num_cases, shape, voxel_size, generator_seed: generation parameters.
        **kwargs: :class:`MSDDataModule` arguments.
    """

    dataset_name = "synthetic_msd"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        num_cases: int = 12,
        shape: tuple[int, int, int] = (64, 64, 24),
        voxel_size: tuple[float, float, float] = (0.8, 0.8, 2.5),
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.generation = {
            "num_cases": num_cases,
            "shape": tuple(shape),
            "voxel_size": tuple(voxel_size),
            "seed": generator_seed,
        }

    def prepare_data(self) -> None:
        """Generate the dataset unless ``root`` already holds it (atomic, idempotent)."""
        generate_synthetic_msd(self.root, **self.generation)

    def validate(self) -> None:
        self.prepare_data()  # run.py validates before the trainer would call prepare_data
        super().validate()

    def check_items(self, workers: int = 1) -> list[Section]:
        self.prepare_data()  # generated on first use, as a run would
        return super().check_items(workers)
