"""Synthetic Something-Something V1 generator: determinism, layout, atomicity, motion-only classes."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from cakes.data import synthetic_video
from cakes.data.synthetic_video import (
    CLASS_SPECS,
    VALID_NUM_CLASSES,
    SyntheticSomethingSomethingDataModule,
    generate_synthetic_ssv1,
    render_video,
    synthetic_class_names,
)
from cakes.datamodules.video_transforms import flip_label_map

TINY = {"num_classes": 4, "train_per_class": 2, "val_per_class": 1, "num_frames": 8, "height": 32, "width": 40}


def tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- classes
REVERSED_PAIRS = [
    ("Moving something from left to right", "Moving something from right to left"),
    ("Moving something towards the camera", "Moving something away from the camera"),
    ("Pushing something from left to right", "Pulling something from right to left"),
    ("Pushing something from right to left", "Pulling something from left to right"),
    ("Moving something up", "Moving something down"),
]


@pytest.mark.parametrize(("forward", "backward"), REVERSED_PAIRS)
def test_reversed_class_is_exactly_the_reversed_video(forward: str, backward: str) -> None:
    for seed in range(3):
        a = render_video(forward, np.random.default_rng(seed), 12, 40, 48)
        b = render_video(backward, np.random.default_rng(seed), 12, 40, 48)
        assert a.shape == (12, 40, 48, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(b, a[::-1])
        # the same multiset of frames: a per-frame model sees identical inputs
        assert sorted(a.mean(axis=(1, 2, 3)).tolist()) == sorted(b.mean(axis=(1, 2, 3)).tolist())
        assert not np.array_equal(a, b)  # yet the order differs (there is motion)


def test_mirrored_classes_match_the_flip_label_map() -> None:
    names = synthetic_class_names(10)
    mapping = flip_label_map(names)
    for name in ["Pushing something from left to right", "Pulling something from right to left"]:
        partner = names[mapping[names.index(name)]]  # its mirror image by construction
        for seed in range(2):
            frames = render_video(name, np.random.default_rng(seed))
            np.testing.assert_array_equal(render_video(partner, np.random.default_rng(seed)), frames[:, :, ::-1])
    pairs = {frozenset((names[i], names[j])) for i, j in enumerate(mapping) if i != j}
    assert pairs == {
        frozenset(("Moving something from left to right", "Moving something from right to left")),
        frozenset(("Pushing something from left to right", "Pushing something from right to left")),
        frozenset(("Pulling something from left to right", "Pulling something from right to left")),
    }


def test_classes_move() -> None:
    for name, *_ in CLASS_SPECS:
        frames = render_video(name, np.random.default_rng(0)).astype(np.float32)
        assert np.abs(frames[-1] - frames[0]).mean() > 5, name


def test_class_name_validation() -> None:
    assert [len(synthetic_class_names(n)) for n in VALID_NUM_CLASSES] == list(VALID_NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes must be one of"):
        synthetic_class_names(6)
    with pytest.raises(ValueError, match="unknown synthetic class"):
        render_video("Juggling something", np.random.default_rng(0))


# --------------------------------------------------------------------------- files
def test_layout_and_determinism(tmp_path: Path) -> None:
    root = generate_synthetic_ssv1(tmp_path / "a", seed=3, **TINY)
    assert root == tmp_path / "a"
    names = sorted(synthetic_class_names(4))
    assert (root / "something-something-v1-labels.csv").read_text().splitlines() == names
    train = (root / "something-something-v1-train.csv").read_text().splitlines()
    val = (root / "something-something-v1-validation.csv").read_text().splitlines()
    assert len(train) == 8 and len(val) == 4
    for line in train + val:
        video_id, name = line.split(";")
        assert name in names
        frames = sorted((root / "20bn-something-something-v1" / video_id).iterdir())
        assert [f.name for f in frames] == [f"{k:05d}.jpg" for k in range(1, 9)]
    assert json.loads((root / "synthetic_ssv1.json").read_text())["seed"] == 3
    assert leftovers(tmp_path) == []

    same = generate_synthetic_ssv1(tmp_path / "b", seed=3, **TINY)
    other = generate_synthetic_ssv1(tmp_path / "c", seed=4, **TINY)
    assert tree_digest(root) == tree_digest(same)
    digest, other_digest = tree_digest(root), tree_digest(other)
    assert digest.keys() == other_digest.keys()
    assert digest["something-something-v1-train.csv"] == other_digest["something-something-v1-train.csv"]
    assert digest["20bn-something-something-v1/1/00001.jpg"] != other_digest["20bn-something-something-v1/1/00001.jpg"]


def test_idempotent_and_refuses_foreign_folders(tmp_path: Path) -> None:
    root = generate_synthetic_ssv1(tmp_path / "data", **TINY)
    marker = root / "synthetic_ssv1.json"
    stamp = marker.stat().st_mtime_ns
    assert generate_synthetic_ssv1(root, **TINY) == root
    assert marker.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match=r"train_per_class=2 \(requested 3\)"):
        generate_synthetic_ssv1(root, **{**TINY, "train_per_class": 3})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        generate_synthetic_ssv1(foreign, **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_synthetic_ssv1(empty, **TINY) / "synthetic_ssv1.json").is_file()


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = synthetic_video.render_video

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic_video, "render_video", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic_ssv1(tmp_path / "data", **TINY)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_video.main(
        [
            "--root",
            str(tmp_path / "cli"),
            "--num-classes",
            "2",
            "--train-per-class",
            "1",
            "--val-per-class",
            "1",
            "--num-frames",
            "4",
            "--height",
            "16",
            "--width",
            "16",
        ]
    )
    assert "4 videos ready" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "synthetic_ssv1.json").read_text())["num_classes"] == 2


# --------------------------------------------------------------------------- datamodule
def test_synthetic_datamodule_runs_the_real_loader(tmp_path: Path) -> None:
    dm = SyntheticSomethingSomethingDataModule(
        tmp_path / "syn",
        num_classes=4,
        train_per_class=2,
        val_per_class=1,
        video_frames=8,
        height=32,
        width=40,
        num_frames=4,
        crop_size=24,
        test_short_side=32,
        batch_size=4,
        num_workers=0,
    )
    assert dm.num_classes == 4 and dm.class_names == sorted(synthetic_class_names(4))  # before any data
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "syn"))):
        dm.setup("fit")
    dm.validate()  # generates, then checks the files
    assert (tmp_path / "syn" / "synthetic_ssv1.json").is_file()
    dm.prepare_data()  # idempotent
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 24, 24) and batch["label"].max() < 4
    val = next(iter(dm.val_dataloader()))
    assert val["video"].shape == (4, 3, 4, 24, 24)
    assert sorted(val["label"].tolist()) == [0, 1, 2, 3]


def test_synthetic_datamodule_rejects_other_layouts(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="version"):
        SyntheticSomethingSomethingDataModule(tmp_path, version="v2")


@pytest.mark.slow
def test_default_size_generates_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = generate_synthetic_ssv1(tmp_path / "default")
    assert time.perf_counter() - start < 30
    assert len((root / "something-something-v1-train.csv").read_text().splitlines()) == 8 * 96
