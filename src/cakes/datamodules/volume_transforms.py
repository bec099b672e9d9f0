"""MONAI pipelines shared by the CT segmentation data modules (MSD Task07, NIH Pancreas-CT).

Every sample is a dict ``{"case": id, "index": position in its split, "image": path, "label": path}``.

* load: ``LoadImaged`` (channel first) → :class:`CheckPaird` (same grid, integer labels in
  ``[0, num_classes)``, else an error naming the case) → [copy the label as ``original_label``]
  → ``Orientationd`` RAS → ``Spacingd`` (bilinear image, nearest label) → HU window → ``[0, 1]``
  with clipping.
* train: load → ``SpatialPadd`` to the patch → ``RandCropByPosNegLabeld`` (``pos : neg``
  foreground/background-centred crops, ``crops_per_volume`` per volume) → random flips on
  ``flip_axes`` → random 90° rotations in ``rotate_planes`` → ``image`` float (1, D, H, W),
  ``label`` long (1, D, H, W), metadata dropped.
* eval: load → whole volume, image and labels keep their MetaTensor metadata (affine, file name).

``CacheDataset`` caches everything before the first random transform (i.e. the load part).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRanged,
    SpatialPadd,
    Spacingd,
)

KEYS = ("image", "label")
#: absolute tolerance (mm) when comparing image and label affines
AFFINE_ATOL = 1e-3


class CheckPaird(MapTransform):
    """Raise ``ValueError`` naming the case when image and label differ in spatial shape or affine,
    or the label holds values that are not integers in ``[0, num_classes)``."""

    def __init__(self, num_classes: int, keys: KeysCollection = KEYS) -> None:
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, label = (d[k] for k in self.keys)
        case = d.get("case", "?")
        check_grids(
            case, tuple(image.shape[1:]), np.asarray(image.affine), tuple(label.shape[1:]), np.asarray(label.affine)
        )
        values = torch.unique(torch.as_tensor(label))
        bad = values[(values < 0) | (values >= self.num_classes) | (values != values.round())]
        if bad.numel():
            raise ValueError(
                f"case {case!r}: label {_path(label)} holds values {bad.tolist()[:5]} outside the "
                f"integer classes 0..{self.num_classes - 1}"
            )
        return d


def _path(tensor: Any) -> str:
    meta = getattr(tensor, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "?"))


def check_grids(
    case: str,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
) -> None:
    """``ValueError`` naming ``case`` when the label is not on the image's voxel grid."""
    if tuple(image_shape) != tuple(label_shape):
        raise ValueError(f"case {case!r}: image shape {tuple(image_shape)} != label shape {tuple(label_shape)}")
    if not np.allclose(image_affine, label_affine, rtol=0, atol=AFFINE_ATOL):
        raise ValueError(
            f"case {case!r}: image and label affines differ (tolerance {AFFINE_ATOL} mm):\n"
            f"image\n{np.round(image_affine, 4)}\nlabel\n{np.round(label_affine, 4)}"
        )


def load_transforms(
    *,
    num_classes: int,
    spacing: Sequence[float],
    window: Sequence[float],
    image_reader: str = "NibabelReader",
    keep_original_label: bool = False,
) -> list[Any]:
    """Deterministic part: read, check, RAS, resample to ``spacing`` (mm), window HU ``[lo, hi]`` → [0, 1]."""
    steps: list[Any] = [
        LoadImaged("image", reader=image_reader, ensure_channel_first=True, image_only=True),
        LoadImaged("label", reader="NibabelReader", ensure_channel_first=True, image_only=True),
        CheckPaird(num_classes),
    ]
    if keep_original_label:  # (not "label_…": MONAI's Spacingd takes such keys for metadata dicts)
        steps.append(CopyItemsd("label", names="original_label"))
    steps += [
        Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(KEYS, pixdim=tuple(float(s) for s in spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True),
    ]
    return steps


def train_transforms(
    *,
    num_classes: int,
    spacing: Sequence[float],
    window: Sequence[float],
    patch_size: Sequence[int],
    crops_per_volume: int = 1,
    pos: float = 1.0,
    neg: float = 1.0,
    flip_axes: Sequence[int] = (0, 1, 2),
    rotate_planes: Sequence[Sequence[int]] = ((0, 1), (0, 2), (1, 2)),
    image_reader: str = "NibabelReader",
) -> Compose:
    """Load, then ``crops_per_volume`` random patches per volume (a list of dicts; collate with
    ``list_data_collate``), flips and 90° rotations (each p = 0.5, k uniform in 1..3)."""
    patch = tuple(int(s) for s in patch_size)
    steps = load_transforms(num_classes=num_classes, spacing=spacing, window=window, image_reader=image_reader)
    steps += [
        SpatialPadd(KEYS, spatial_size=patch),
        RandCropByPosNegLabeld(
            KEYS,
            label_key="label",
            spatial_size=patch,
            pos=pos,
            neg=neg,
            num_samples=crops_per_volume,
            image_key="image",
            image_threshold=0.0,
        ),
    ]
    steps += [RandFlipd(KEYS, prob=0.5, spatial_axis=int(axis)) for axis in flip_axes]
    steps += [
        RandRotate90d(KEYS, prob=0.5, max_k=3, spatial_axes=tuple(int(a) for a in plane)) for plane in rotate_planes
    ]
    steps += [
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
        EnsureTyped("label", dtype=torch.long, track_meta=False),
    ]
    return Compose(steps)


def eval_transforms(
    *,
    num_classes: int,
    spacing: Sequence[float],
    window: Sequence[float],
    image_reader: str = "NibabelReader",
    keep_original_label: bool = False,
) -> Compose:
    """Load the whole volume; labels as long; metadata (affine, file name) kept for writing predictions."""
    steps = load_transforms(
        num_classes=num_classes,
        spacing=spacing,
        window=window,
        image_reader=image_reader,
        keep_original_label=keep_original_label,
    )
    steps.append(EnsureTyped("image", dtype=torch.float32))
    steps.append(EnsureTyped(["label", "original_label"] if keep_original_label else "label", dtype=torch.long))
    return Compose(steps)
