"""Volumetric data on the synthetic MSD set: generation, spacing/windowing, crops, splits, folds, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cakes.data.synthetic_volume import HU, generate_synthetic_msd, has_lesion
from cakes.datamodules.msd import MSDDataModule
from cakes.datamodules.nih import NIHPancreasDataModule

REGIONS = {"pancreas": [1, 2], "tumour": [2]}
SMALL = {"num_cases": 6, "shape": (40, 40, 16), "voxel_size": (0.8, 0.8, 2.5), "seed": 3}


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_msd(tmp_path_factory.mktemp("data") / "Task07", **SMALL)


def make_dm(root: Path, **kw) -> MSDDataModule:
    args = {
        "num_classes": 3,
        "regions": REGIONS,
        "spacing": (1.6, 1.6, 1.6),
        "patch_size": (16, 16, 16),
        "batch_size": 2,
        "crops_per_volume": 2,
        "num_workers": 0,
        "val_fraction": 0.34,
        **kw,
    }
    return MSDDataModule(root, **args)


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def test_generation_is_deterministic_idempotent_and_in_msd_layout(msd_root: Path, tmp_path: Path) -> None:
    meta = json.loads((msd_root / "dataset.json").read_text())
    assert {
        "name",
        "description",
        "reference",
        "licence",
        "relase",
        "tensorImageSize",
        "modality",
        "labels",
        "numTraining",
        "numTest",
        "training",
        "test",
    } <= set(meta)
    assert meta["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"} and meta["numTraining"] == 6
    stamp = (msd_root / "synthetic_msd.json").stat().st_mtime_ns
    assert generate_synthetic_msd(msd_root, **SMALL) == msd_root  # idempotent: nothing rewritten
    assert (msd_root / "synthetic_msd.json").stat().st_mtime_ns == stamp
    again = generate_synthetic_msd(tmp_path / "again", **SMALL)
    for name in ("imagesTr/pancreas_002.nii.gz", "labelsTr/pancreas_003.nii.gz"):
        assert np.array_equal(nib.load(again / name).get_fdata(), nib.load(msd_root / name).get_fdata())
    with pytest.raises(FileExistsError, match=r"holds a synthetic dataset with seed=3 \(requested 4\)"):
        generate_synthetic_msd(msd_root, **{**SMALL, "seed": 4})
    for i in range(1, 7):
        label = np.asarray(nib.load(msd_root / f"labelsTr/pancreas_{i:03d}.nii.gz").dataobj)
        assert (label == 2).any() == has_lesion(i) and (label == 1).any()
    assert (msd_root / "imagesTr" / "._pancreas_001.nii.gz").is_file()  # stray file, never listed


def test_eval_volumes_are_ras_resampled_and_windowed(msd_root: Path) -> None:
    dm = make_dm(msd_root, eval_space="original")
    dm.validate()
    dm.setup("validate")
    sample = dm.val_set[0]
    image, label, original = sample["image"], sample["label"], sample["original_label"]
    affine = np.asarray(image.affine)
    assert np.allclose(np.diag(affine)[:3], 1.6)  # RAS (stored LPS-style), 1.6 mm
    assert tuple(image.shape) == (1, 21, 21, 24) == tuple(label.shape)  # 31.2 x 31.2 x 37.5 mm
    assert tuple(original.shape) == (1, 40, 40, 16) and label.dtype == torch.long
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0  # air and bone clipped
    organ = image[label == 1]
    expected = (HU["organ"] + 100) / 340
    assert abs(float(organ.median()) - expected) < 0.05
    assert sample["case"] == dm.split["val"][0] and sample["index"] == 0


def test_train_crops_shapes_and_foreground_bias(msd_root: Path) -> None:
    dm = make_dm(msd_root, crop_neg=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.long
    assert all((label > 0).any() for label in batch["label"])  # crop_neg=0: centred on foreground
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2}


def test_train_crops_are_a_function_of_the_sample_seed(msd_root: Path) -> None:
    """Crops depend on (case, seed) only — not on what was drawn before (resume, workers)."""
    dm = make_dm(msd_root)
    dm.setup("fit")
    samples = dm.train_dataloader().dataset
    first = samples[(0, 123)]
    samples[(1, 7)]
    samples[(0, 99)]
    again = samples[(0, 123)]
    other = samples[(0, 124)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True))


def test_split_is_written_and_reusable(msd_root: Path, tmp_path: Path) -> None:
    dm = make_dm(msd_root, split_dir=tmp_path / "run")
    dm.setup("validate")
    written = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(written["val"]) == 2 and len(written["train"]) == 4
    assert not set(written["val"]) & set(written["train"])
    again = make_dm(msd_root, split_file=tmp_path / "run" / "split.json", split_seed=99)
    assert again.resolve_split()["val"] == written["val"]
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["pancreas_001"], "val": ["pancreas_999"]}))
    with pytest.raises(ValueError, match=r"val cases \['pancreas_999'\] are not in the dataset"):
        make_dm(msd_root, split_file=tmp_path / "bad.json").validate()


def test_setup_errors_name_the_case_and_file(msd_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MSD dataset root not found"):
        make_dm(tmp_path / "nowhere").validate()
    root = copy_of(msd_root, tmp_path)
    (root / "labelsTr" / "pancreas_004.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case 'pancreas_004': label listed in .*dataset.json not found"):
        make_dm(root).validate()
    image = nib.load(root / "imagesTr" / "pancreas_004.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 15), np.uint8), image.affine), root / "labelsTr" / "pancreas_004.nii.gz")
    with pytest.raises(ValueError, match=r"case 'pancreas_004': image shape \(40, 40, 16\) != label shape \(40, 40,"):
        make_dm(root).validate()
    shifted = image.affine.copy()
    shifted[0, 0] *= -1  # an axis flip, the classic conversion pitfall
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 16), np.uint8), shifted), root / "labelsTr" / "pancreas_004.nii.gz")
    with pytest.raises(ValueError, match=r"case 'pancreas_004': image and label affines differ"):
        make_dm(root).validate()
    bad_values = nib.Nifti1Image(np.full((40, 40, 16), 3, np.uint8), image.affine)
    nib.save(bad_values, root / "labelsTr" / "pancreas_004.nii.gz")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["pancreas_001", "pancreas_002"], "val": ["pancreas_004"]}))
    dm = make_dm(root, split_file=split)
    dm.validate()  # header-level checks pass; label values are checked when loaded
    dm.setup("validate")
    with pytest.raises(RuntimeError) as err:  # a CaseError: the loading error itself names the case and file
        dm.val_set[0]
    assert re.search(r"^case 'pancreas_004': label .*pancreas_004.nii.gz holds values \[3.0\]", str(err.value))
    (root / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="MSD dataset.json not found"):
        make_dm(root).validate()
    with pytest.raises(ValueError, match="does not list num_classes=2"):
        make_dm(msd_root, num_classes=2, regions={"pancreas": [1]}).validate()


def test_bad_arguments_are_rejected(msd_root: Path) -> None:
    with pytest.raises(ValueError, match="crops_per_volume"):
        make_dm(msd_root, crops_per_volume=3)
    with pytest.raises(ValueError, match="needs equal patch sizes"):
        make_dm(msd_root, patch_size=(16, 16, 32))
    with pytest.raises(ValueError, match="window"):
        make_dm(msd_root, window=(240, -100))
    with pytest.raises(ValueError, match="regions"):
        make_dm(msd_root, regions={"tumour": [3]})


@pytest.fixture(scope="module")
def nih_root(msd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cases in the NIH layout (NIfTI images, binary labels), plus an unlabelled image."""
    root = tmp_path_factory.mktemp("nih")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for i in range(1, 7):
        image = nib.load(msd_root / f"imagesTr/pancreas_{i:03d}.nii.gz")
        label = nib.load(msd_root / f"labelsTr/pancreas_{i:03d}.nii.gz")
        nib.save(image, root / "images" / f"PANCREAS_{i:04d}.nii.gz")
        binary = (np.asarray(label.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(binary, label.affine), root / "labels" / f"label{i:04d}.nii.gz")
    shutil.copy(root / "images" / "PANCREAS_0001.nii.gz", root / "images" / "PANCREAS_0099.nii.gz")
    (root / "labels" / "._label0001.nii.gz").write_bytes(b"junk")
    return root


def make_nih(root: Path, **kw) -> NIHPancreasDataModule:
    args = {
        "num_classes": 2,
        "regions": {"pancreas": [1]},
        "image_format": "nifti",
        "spacing": (1.6, 1.6, 1.6),
        "patch_size": (16, 16, 16),
        "batch_size": 2,
        "crops_per_volume": 2,
        "num_workers": 0,
        "num_folds": 3,
        **kw,
    }
    return NIHPancreasDataModule(root, **args)


def test_nih_folds_cover_every_case_once(nih_root: Path, tmp_path: Path) -> None:
    folds = []
    for fold in range(3):
        dm = make_nih(nih_root, fold=fold, split_dir=tmp_path / f"f{fold}")
        with pytest.warns(UserWarning, match=r"images without a label file are not used: \['PANCREAS_0099.nii.gz'\]"):
            dm.validate()
        folds.append(dm.split["val"])
        assert sorted(dm.split["train"] + dm.split["val"]) == [f"PANCREAS_{i:04d}" for i in range(1, 7)]
        assert dm.protocol()["fold"] == f"{fold}/3"
    assert sorted(sum(folds, [])) == [f"PANCREAS_{i:04d}" for i in range(1, 7)]
    dm.setup("fit")
    assert json.loads((tmp_path / "f2" / "folds.json").read_text())["folds"] == [sorted(f) for f in folds]
    reused = make_nih(nih_root, fold=1, split_file=tmp_path / "f2" / "folds.json", split_seed=7)
    with pytest.warns(UserWarning, match="images without a label file"):
        assert reused.resolve_split()["val"] == folds[1]
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].shape == (2, 1, 16, 16, 16) and int(batch["label"].max()) <= 1


def test_nih_errors(nih_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(nih_root, tmp_path / "nih"))
    (root / "images" / "PANCREAS_0003.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case 'PANCREAS_0003': image not found"):
        make_nih(root).validate()
    with pytest.raises(ValueError, match=r"exclude_cases \['PANCREAS_0042'\] are not cases"):
        make_nih(root, exclude_cases=["PANCREAS_0003", "PANCREAS_0042"]).validate()
    with pytest.raises(ValueError, match="fold"):
        make_nih(root, fold=3)


def write_dicom_series(volume: np.ndarray, ras_affine: np.ndarray, folder: Path) -> None:
    """One CT slice per file, named and numbered against the slice order (the reader must sort by position)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    series = generate_uid()
    folder.mkdir(parents=True)
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality, ds.InstanceNumber = "CT", volume.shape[2] - k
        ds.ImageOrientationPatient = [*(lps[:3, 0] / spacing[0]), *(lps[:3, 1] / spacing[1])]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [0, 0, k] + lps[:3, 3]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{(k * 7) % volume.shape[2]:03d}.dcm", enforce_file_format=True)


def test_nih_dicom_series_matches_the_nifti(nih_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(nih_root, tmp_path / "nih", ignore=shutil.ignore_patterns("PANCREAS_0099*")))
    for i in range(1, 7):
        image = nib.load(root / "images" / f"PANCREAS_{i:04d}.nii.gz")
        write_dicom_series(np.asarray(image.dataobj), image.affine, root / "dicom" / f"PANCREAS_{i:04d}" / "series")
    nifti = make_nih(root, fold=1, eval_space="original")
    dicom = make_nih(root, fold=1, eval_space="original", image_format="dicom", image_dir="dicom")
    for dm in (nifti, dicom):
        dm.validate()
        dm.setup("validate")
    a, b = nifti.val_set[0], dicom.val_set[0]
    assert np.allclose(np.asarray(a["image"].affine), np.asarray(b["image"].affine), atol=1e-4)
    assert torch.allclose(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-5)
    assert torch.equal(a["label"], b["label"])
