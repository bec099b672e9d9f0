"""Something-Something V1 (jpg frames) and V2 (webm videos): the annotation parser of
:class:`~cakes.datamodules.video.VideoDataModule` for the official layouts.

Layouts under ``root`` (file names are arguments; these are the defaults)::

    v1, list_format="csv":  20bn-something-something-v1/<id>/00001.jpg ...
                            something-something-v1-labels.csv        class name per line
                            something-something-v1-{train,validation}.csv   "<id>;<class name>"
    v1, list_format="trn":  same frames; category.txt (class name per line),
                            {train,val}_videofolder.txt   "<id> <num_frames> <label_idx>"
    v2, list_format="json": 20bn-something-something-v2/<id>.webm
                            something-something-v2-labels.json       {"class name": "idx"}
                            something-something-v2-{train,validation}.json
                                [{"id": ..., "template": "Pushing [something] ..."}, ...]

Labels index ``class_names``, the alphabetically sorted class list (TRN lists index the same
order). The published validation split doubles as the test split. Batches: see
:mod:`cakes.datamodules.video_dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from cakes.datamodules.annotations import (
    parse_trn_list,
    parse_v1_csv,
    parse_v2_json,
    read_class_list,
    read_v2_class_json,
)
from cakes.datamodules.video import Split, VideoDataModule
from cakes.datamodules.video_dataset import VideoRecord

Version = Literal["v1", "v2"]
ListFormat = Literal["csv", "trn", "json"]

#: (version, list_format) -> (media dir, labels file, train file, validation file)
OFFICIAL_FILES: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("v1", "csv"): (
        "20bn-something-something-v1",
        "something-something-v1-labels.csv",
        "something-something-v1-train.csv",
        "something-something-v1-validation.csv",
    ),
    ("v1", "trn"): (
        "20bn-something-something-v1",
        "category.txt",
        "train_videofolder.txt",
        "val_videofolder.txt",
    ),
    ("v2", "json"): (
        "20bn-something-something-v2",
        "something-something-v2-labels.json",
        "something-something-v2-train.json",
        "something-something-v2-validation.json",
    ),
}
DEFAULT_LIST_FORMAT: dict[str, str] = {"v1": "csv", "v2": "json"}


class SomethingSomethingDataModule(VideoDataModule):
    """Something-Something V1/V2 with TSN sampling and augmentation.

    Args:
        root: dataset folder (see the module docstring for the layout).
        version: ``"v1"`` (jpg frames) or ``"v2"`` (webm videos).
        list_format: ``"csv"`` or ``"trn"`` (v1), ``"json"`` (v2); ``None`` = the official one.
        media_dir, labels_file, train_file, val_file: paths relative to ``root`` (or
            absolute); ``None`` = the official names for ``version``/``list_format``.
        **kwargs: the loader arguments of :class:`~cakes.datamodules.video.VideoDataModule`
            (``num_classes``: 174 for both versions, checked against the labels file).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        version: Version = "v1",
        list_format: ListFormat | None = None,
        media_dir: str | None = None,
        labels_file: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        if version not in DEFAULT_LIST_FORMAT:
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        fmt = list_format or DEFAULT_LIST_FORMAT[version]
        if (version, fmt) not in OFFICIAL_FILES:
            allowed = [f for v, f in OFFICIAL_FILES if v == version]
            raise ValueError(f"list_format for {version} must be one of {allowed}, got {fmt!r}")
        super().__init__(root, **kwargs)
        self.version, self.list_format = version, fmt
        self.media = "video" if version == "v2" else "frames"
        default_media, default_labels, default_train, default_val = OFFICIAL_FILES[(version, fmt)]
        self.media_path = self._under_root(media_dir or default_media)
        self.labels_path = self._under_root(labels_file or default_labels)
        self.train_path = self._under_root(train_file or default_train)
        self.val_path = self._under_root(val_file or default_val)

    def _under_root(self, name: str) -> Path:
        """``name`` if absolute, else ``root / name``."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    def annotation_source(self, part: Literal["classes", "train", "val"]) -> str:
        return str({"classes": self.labels_path, "train": self.train_path, "val": self.val_path}[part])

    def read_class_names(self) -> list[str]:
        """Read the sorted class names from the labels file (cheap; no split parsing)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"Something-Something {self.version} root not found: {self.root}")
        if self.version == "v2":
            return read_v2_class_json(self.labels_path)
        return read_class_list(self.labels_path)

    def parse_annotations(self, split: Split) -> list[VideoRecord]:
        """The videos of the ``split`` list file, in the layout of ``version`` / ``list_format``."""
        if not self.media_path.is_dir():
            raise FileNotFoundError(f"Something-Something {self.version} media folder not found: {self.media_path}")
        path = self.train_path if split == "train" else self.val_path
        if self.list_format == "csv":
            return parse_v1_csv(path, self.class_names, self.media_path)
        if self.list_format == "trn":
            return parse_trn_list(path, self.num_classes, self.media_path)
        return parse_v2_json(path, self.class_names, self.media_path)
