"""``python -m cakes.check_data``: every bad item named, non-zero exit; training with
``data.bad_sample=skip`` finishes and reports exactly those skips, per epoch."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from cakes.callbacks.bad_samples import BadSampleReport
from cakes.check_data import main
from cakes.config import compose_config
from cakes.data.synthetic_video import generate_synthetic_ssv1
from cakes.data.synthetic_volume import generate_synthetic_msd
from cakes.datamodules.video_readers import BadSampleWarning
from cakes.run import run

ROOT = Path(__file__).resolve().parents[1]
VIDEO = [
    "data.num_classes=4",
    "data.train_per_class=4",
    "data.val_per_class=2",
    "data.video_frames=8",
    "data.height=40",
    "data.width=48",
]
GENERATION = {"num_classes": 4, "train_per_class": 4, "val_per_class": 2, "num_frames": 8, "height": 40, "width": 48}
# every frame of the 8-frame videos is read (8 segments), so a corrupt jpg is always hit
TRAIN = [
    "data.num_frames=8",
    "data.crop_size=32",
    "data.test_short_side=40",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_epochs=2",
    "+trainer.limit_val_batches=1",
    "test=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture()
def broken_video(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The synthetic set with a corrupt jpg in one training video and another's frame folder gone."""
    root = tmp_path / "ssv1"
    generate_synthetic_ssv1(root, **GENERATION)
    train_ids = [line.split(";")[0] for line in (root / "something-something-v1-train.csv").read_text().splitlines()]
    frames = root / "20bn-something-something-v1"
    corrupt = frames / train_ids[1] / "00003.jpg"
    corrupt.write_bytes(b"not a jpeg")
    missing = frames / train_ids[5]
    for frame in missing.iterdir():
        frame.unlink()
    missing.rmdir()
    return root, corrupt, missing


def test_check_data_names_each_bad_video(broken_video, capsys):
    root, corrupt, missing = broken_video
    assert main([*VIDEO, f"data.root={root}", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"BAD train '{corrupt.parent.name}': cannot decode frame {corrupt}" in out
    assert f"BAD train '{missing.name}': frame folder missing: {missing}" in out
    assert "train: 16 checked" in out and "val: 8 checked, 64 frames decoded, 0 bad" in out
    assert "result: FAILED: 2 bad item(s)" in out


def test_check_data_reports_list_errors_and_clean_data(tmp_path, capsys):
    root = tmp_path / "ssv1"
    generate_synthetic_ssv1(root, **GENERATION)
    assert main([*VIDEO, f"data.root={root}", "--workers", "1"]) == 0
    assert "result: OK" in capsys.readouterr().out
    with (root / "something-something-v1-validation.csv").open("a") as handle:
        handle.write("999;Not a class\n")
    assert main([*VIDEO, f"data.root={root}", "--workers", "1"]) == 1
    assert "class 'Not a class' is not in the labels file" in capsys.readouterr().out
    assert main(["data.root=/nonexistent", "--workers", "1", "data.num_classes=3"]) == 2  # unusable config


def test_check_data_volumes(tmp_path, capsys):
    root = tmp_path / "msd"
    generate_synthetic_msd(root, num_cases=5, shape=(24, 24, 8))
    overrides = [
        "experiment=demo_msd_c3d",
        f"data.root={root}",
        "data.num_cases=5",
        "data.shape=[24,24,8]",
        "--workers",
        "1",
    ]
    assert main(overrides) == 0
    label = root / "labelsTr" / "pancreas_002.nii.gz"
    image = nib.load(label)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, :-1], image.affine), label)  # mismatched label
    other = root / "labelsTr" / "pancreas_004.nii.gz"
    image = nib.load(other)
    values = np.asanyarray(image.dataobj).copy()
    values[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(values, image.affine), other)
    assert main(overrides) == 1
    out = capsys.readouterr().out
    assert "BAD cases 'pancreas_002': case 'pancreas_002': image shape (24, 24, 8) != label shape (24, 24, 7)" in out
    assert "BAD cases 'pancreas_004'" in out and "values [5] outside 0..2" in out
    assert "result: FAILED: 2 bad item(s)" in out


def test_check_data_command_line(broken_video):
    root, corrupt, _ = broken_video
    result = subprocess.run(
        [sys.executable, "-m", "cakes.check_data", *VIDEO, f"data.root={root}", "--workers", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and str(corrupt) in result.stdout


@pytest.mark.slow
def test_training_skips_exactly_the_bad_videos(broken_video, tmp_path, monkeypatch, capsys):
    root, corrupt, missing = broken_video
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", ["experiment=demo_c3d", *VIDEO, *TRAIN, f"data.root={root}", "data.bad_sample=skip"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg)
    named = {str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)}
    assert any(str(corrupt) in m for m in named) and any(str(missing) in m for m in named)
    assert all(str(corrupt) in m or str(missing) in m for m in named)  # nothing else was skipped
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    per_epoch = [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")]
    assert per_epoch == [2.0, 2.0]  # 16 videos, 4 full batches: both bad ones in every epoch
    err = capsys.readouterr().err
    assert "epoch 0: skipped 2 unreadable training sample(s)" in err and "epoch 1: skipped 2" in err


def test_bad_sample_report_is_silent_without_skips():
    assert BadSampleReport().history == []


def test_bad_sample_report_is_the_one_counter(capsys):
    """Counted once per epoch over the batches, summed over ranks, logged once and printed."""
    logged = []
    module = SimpleNamespace(device="cpu", log=lambda name, value, **kwargs: logged.append((name, value)))
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce=lambda total, reduce_op: total), current_epoch=3, is_global_zero=True
    )
    report = BadSampleReport()
    report.on_train_epoch_start(trainer, module)
    for skipped in (1, 0, 2):
        report.on_train_batch_start(trainer, module, {"video": None, "skipped": skipped}, 0)
    report.on_train_epoch_end(trainer, module)
    assert logged == [("train/skipped_samples", 3.0)] and report.history == [(3, 3)]
    assert "epoch 3: skipped 3 unreadable training sample(s)" in capsys.readouterr().err
    volumes = BadSampleReport()  # batches without a skip count (volume data): nothing logged or printed
    volumes.on_train_epoch_start(trainer, module)
    volumes.on_train_batch_start(trainer, module, {"image": None}, 0)
    volumes.on_train_epoch_end(trainer, module)
    assert logged == [("train/skipped_samples", 3.0)] and volumes.history == [(3, 0)]
    assert capsys.readouterr().err == ""
