"""A synthetic MSD Task07_Pancreas look-alike, written in the real MSD layout.

Each case is a small CT-like volume (default 64×64×24 voxels at 0.8×0.8×2.5 mm, stored with an
LPS-style affine so that loading must reorient): air (-1000 HU) around an elliptic body with a fat
rim (-100 HU), soft tissue (40 HU) and a vertebra (400 HU); a deformed ellipsoid "organ" (100 HU,
label 1) and, in two cases of three, a hypodense lesion inside it (-20 HU, label 2; a sphere of
0.9–1.2× the organ's smallest radius, cut by the organ); Gaussian noise (σ 15 HU).
Deterministic from ``seed``.

Output (``root``)::

    dataset.json                    the real keys (name, labels, numTraining, training, test, …)
    imagesTr/pancreas_001.nii.gz …  int16 HU
    labelsTr/pancreas_001.nii.gz …  uint8 0/1/2
    imagesTr/._pancreas_001.nii.gz  a stray macOS resource file, as in some archives (never listed)
    synthetic_msd.json              generation parameters (written last: the completeness marker)

CLI: ``python -m cakes.data.synthetic_volume --root DIR [--num-cases 12 --seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cakes.data.generate import generate_atomically

#: Bump when rendering changes, so old datasets are not mistaken for new ones.
GENERATOR_VERSION = 2
MARKER = "synthetic_msd.json"
HU = {"air": -1000.0, "fat": -100.0, "tissue": 40.0, "organ": 100.0, "lesion": -20.0, "bone": 400.0}
NOISE_HU = 15.0


def has_lesion(index: int) -> bool:
    """Cases 1, 2, 4, 5, … carry a lesion; every third case (3, 6, …) is tumour-free."""
    return index % 3 != 0


def render_case(
    rng: np.random.Generator, shape: Sequence[int], voxel_size: Sequence[float], lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(image int16 (X, Y, Z) HU, label uint8 (X, Y, Z))`` on a grid of ``voxel_size`` mm."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, voxel_size, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    half = [n * s / 2 for n, s in zip(shape, voxel_size, strict=True)]
    body = (x / (0.9 * half[0])) ** 2 + (y / (0.75 * half[1])) ** 2
    image = np.full(x.shape, HU["air"])
    image[body <= 1] = HU["fat"]
    image[body <= 0.7] = HU["tissue"]
    image[(x**2 + (y + 0.5 * half[1]) ** 2) <= (0.12 * half[0]) ** 2] = HU["bone"]

    # organ: a rotated ellipsoid whose radius wobbles with the angle around its axis
    centre = rng.uniform(-0.2, 0.2, 3) * np.array(half) + np.array([0.0, 0.15 * half[1], 0.0])
    radii = rng.uniform([0.3, 0.2, 0.3], [0.4, 0.28, 0.5]) * np.array(half)
    angle = rng.uniform(0, np.pi)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    theta = np.arctan2(v, u)
    wobble = 1 + sum(rng.uniform(-0.12, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    organ = (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= wobble**2
    label = organ.astype(np.uint8)
    image[organ] = HU["organ"]
    if lesion:
        core = centre + rng.uniform(-0.2, 0.2, 3) * radii
        r = rng.uniform(0.9, 1.2) * radii.min()
        inside = organ & (((x - core[0]) ** 2 + (y - core[1]) ** 2 + (z - core[2]) ** 2) <= r**2)
        label[inside] = 2
        image[inside] = HU["lesion"]
    image += rng.normal(0.0, NOISE_HU, image.shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def case_affine(voxel_size: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """LPS-style storage (x and y axes flipped in RAS world coordinates), centred on the origin."""
    affine = np.diag([-voxel_size[0], -voxel_size[1], voxel_size[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _write_dataset(out: Path, params: dict[str, Any]) -> None:
    """Write every case and dataset.json into ``out``; the marker goes last."""
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    (out / "imagesTs").mkdir()
    affine = case_affine(params["voxel_size"], params["shape"])
    training = []
    for i in range(1, params["num_cases"] + 1):
        name = f"pancreas_{i:03d}.nii.gz"
        image, label = render_case(
            np.random.default_rng([params["seed"], i]), params["shape"], params["voxel_size"], has_lesion(i)
        )
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(out / folder / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (out / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    dataset = {
        "name": "Pancreas",
        "description": "Synthetic pancreas and tumour look-alike (cakes.data.synthetic_volume)",
        "reference": "generated",
        "licence": "CC-BY-SA 4.0",
        "relase": f"synthetic v{GENERATOR_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")


def generate_synthetic_msd(
    root: str | os.PathLike[str],
    *,
    num_cases: int = 12,
    shape: Sequence[int] = (64, 64, 24),
    voxel_size: Sequence[float] = (0.8, 0.8, 2.5),
    seed: int = 0,
) -> Path:
    """Write the synthetic Task07-layout dataset to ``root`` (see the module docstring).

    Atomic: written to a temporary folder next to ``root`` and renamed into place. Idempotent:
    returns at once if ``root`` already holds a complete dataset with the same parameters.

    Raises:
        FileExistsError: ``root`` is non-empty and not a dataset with these parameters.
    """
    if num_cases < 3:
        raise ValueError(f"num_cases must be >= 3 (train and val, with and without lesion), got {num_cases}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8 voxels, got {list(shape)}")
    if len(voxel_size) != 3 or min(voxel_size) <= 0:
        raise ValueError(f"voxel_size must be 3 positive sizes (mm), got {list(voxel_size)}")
    root = Path(root).expanduser().absolute()
    params: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "num_cases": int(num_cases),
        "shape": [int(s) for s in shape],
        "voxel_size": [float(s) for s in voxel_size],
        "seed": int(seed),
    }
    return generate_atomically(root, MARKER, params, lambda out: _write_dataset(out, params))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m cakes.data.synthetic_volume",
        description="Write a synthetic MSD Task07_Pancreas-layout dataset.",
    )
    parser.add_argument("--root", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--num-cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 24), metavar=("X", "Y", "Z"))
    parser.add_argument("--voxel-size", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("SX", "SY", "SZ"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate_synthetic_msd(
        args.root, num_cases=args.num_cases, shape=args.shape, voxel_size=args.voxel_size, seed=args.seed
    )
    print(f"{root}: {args.num_cases} cases ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
