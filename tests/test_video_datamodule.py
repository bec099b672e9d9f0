"""A new video dataset needs only its annotation parser: a tiny :class:`VideoDataModule` subclass with
an in-test list format over the synthetic frames loads batches, validates and checks its items."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cakes.check_data import check_datamodule
from cakes.data.synthetic_video import FRAMES_DIR, SPLIT_FILES, generate_synthetic_ssv1
from cakes.datamodules.video import Split, VideoDataModule
from cakes.datamodules.video_dataset import VideoRecord

GENERATION = {"num_classes": 4, "train_per_class": 2, "val_per_class": 1, "num_frames": 8, "height": 32, "width": 40}
LOADER = {"num_frames": 4, "crop_size": 24, "test_short_side": 32, "batch_size": 4, "num_workers": 0}


class PipeListDataModule(VideoDataModule):
    """``clips.txt``: one ``<split> | <frame folder> | <class name>`` line per video; nothing else."""

    def _lines(self) -> list[list[str]]:
        text = (self.root / "clips.txt").read_text(encoding="utf-8")
        return [[field.strip() for field in line.split("|")] for line in text.splitlines() if line.strip()]

    def read_class_names(self) -> list[str]:
        return sorted({name for _, _, name in self._lines()})

    def parse_annotations(self, split: Split) -> list[VideoRecord]:
        index = {name: i for i, name in enumerate(self.class_names)}
        return [
            VideoRecord(folder, self.root / FRAMES_DIR / folder, index[name])
            for where, folder, name in self._lines()
            if where == split
        ]


@pytest.fixture()
def pipe_root(tmp_path: Path) -> Path:
    """The synthetic frames, annotated in the pipe format instead of the v1 CSVs."""
    root = generate_synthetic_ssv1(tmp_path / "pipe", **GENERATION)
    lines = []
    for split, file in (("train", SPLIT_FILES["train"]), ("val", SPLIT_FILES["validation"])):
        for row in (root / file).read_text(encoding="utf-8").splitlines():
            video_id, name = row.split(";")
            lines.append(f"{split} | {video_id} | {name}\n")
    (root / "clips.txt").write_text("".join(lines), encoding="utf-8")
    return root


def test_a_parser_is_all_a_new_dataset_needs(pipe_root: Path) -> None:
    dm = PipeListDataModule(pipe_root, num_classes=4, **LOADER)
    assert dm.num_classes == 4  # readable before setup
    dm.validate()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (8, 4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 4, 24, 24) and batch["video"].dtype == torch.float32
    assert batch["skipped"] == 0 and 0 <= int(batch["label"].min()) <= int(batch["label"].max()) < 4
    val = next(iter(dm.val_dataloader()))
    assert val["video"].shape == (4, 3, 4, 24, 24)
    assert sorted(val["label"].tolist()) == [0, 1, 2, 3]


def test_the_base_checks_every_item_of_the_new_dataset(pipe_root: Path) -> None:
    dm = PipeListDataModule(pipe_root, **LOADER)
    report = check_datamodule(dm)
    assert report.num_bad == 0
    assert [(s.name, s.items) for s in report.sections] == [("lists", 3), ("train", 8), ("val", 4)]
    assert report.sections[2].units == {"frames decoded": 4 * 8}
    broken = next(p for p in sorted((pipe_root / FRAMES_DIR).iterdir()))
    (broken / "00002.jpg").write_bytes(b"not a jpeg")
    report = check_datamodule(dm)
    assert report.num_bad == 1
    assert f"BAD train '{broken.name}': cannot decode frame {broken / '00002.jpg'}" in report.format()


def test_check_data_needs_a_check_items_method() -> None:
    with pytest.raises(TypeError, match="check_data does not know LightningDataModule"):
        check_datamodule(pl.LightningDataModule())
