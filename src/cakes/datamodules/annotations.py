"""Something-Something annotation files: the class lists and the split lists of V1 (official CSV,
or TRN/TSM ``<id> <num_frames> <label>`` lists) and V2 (official json), parsed into
:class:`~cakes.datamodules.video_dataset.VideoRecord` lists. Every error names the file and line (or
entry).

Labels index the alphabetically sorted class list (TRN lists index the same order).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cakes.datamodules.video_dataset import VideoRecord


def _require_file(path: Path, what: str) -> None:
    """Raise ``FileNotFoundError`` naming ``what`` and ``path`` unless ``path`` is a file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank stripped lines of a text file with their 1-based line numbers."""
    text = path.read_text(encoding="utf-8")
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_class_list(path: Path) -> list[str]:
    """Class names from a one-name-per-line file (v1 labels CSV, TRN category.txt), sorted."""
    _require_file(path, "labels file")
    seen: dict[str, int] = {}
    for n, name in _numbered_lines(path):
        if name in seen:
            raise ValueError(f"{path}:{n}: duplicate class {name!r} (first on line {seen[name]})")
        seen[name] = n
    if not seen:
        raise ValueError(f"{path}: no class names")
    return sorted(seen)


def read_v2_class_json(path: Path) -> list[str]:
    """Class names from the v2 labels json ``{"name": "idx"}``, sorted.

    The file's indices must be ``0..C-1``; labels follow the sorted order, and a warning says
    so if the file numbers classes differently.
    """
    data = _read_json_file(path, "labels file")
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{class name: index}}")
    try:
        indices = {name: int(idx) for name, idx in data.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: class indices must be integers ({err})") from err
    if sorted(indices.values()) != list(range(len(indices))):
        raise ValueError(f"{path}: class indices are not 0..{len(indices) - 1}")
    names = sorted(indices)
    if [indices[name] for name in names] != list(range(len(names))):
        warnings.warn(
            f"{path}: class indices are not in alphabetical order; labels use the sorted order",
            stacklevel=2,
        )
    return names


def _read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of ``path``; a syntax error names the file and line."""
    _require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def _check_video_id(path: Path, where: str, video_id: str) -> None:
    """A video id names one file or folder: not empty, no path separators, not ``.``/``..``."""
    if not video_id or video_id in (".", "..") or "/" in video_id or "\\" in video_id:
        raise ValueError(f"{path}:{where}: invalid video id {video_id!r}")


def _add_unique(records: dict[str, tuple[str, VideoRecord]], path: Path, where: str, rec: VideoRecord) -> None:
    """Add ``rec`` under its id (with where it was listed); a repeated id names both places."""
    if rec.video_id in records:
        raise ValueError(f"{path}:{where}: duplicate video id {rec.video_id!r} (first at {records[rec.video_id][0]})")
    records[rec.video_id] = (where, rec)


def _non_empty(records: dict[str, tuple[str, VideoRecord]], path: Path) -> list[VideoRecord]:
    """The records in list order; a list without videos is an error."""
    if not records:
        raise ValueError(f"{path}: no videos listed")
    return [rec for _, rec in records.values()]


def parse_v1_csv(path: Path, class_names: Sequence[str], frames_root: Path) -> list[VideoRecord]:
    """Parse an official v1 split file of ``<id>;<class name>`` lines."""
    _require_file(path, "split file")
    index = {name: i for i, name in enumerate(class_names)}
    records: dict[str, tuple[str, VideoRecord]] = {}
    for n, line in _numbered_lines(path):
        fields = [f.strip() for f in line.split(";")]
        if len(fields) != 2:
            raise ValueError(f"{path}:{n}: expected '<id>;<class name>', got {line!r}")
        video_id, name = fields
        _check_video_id(path, str(n), video_id)
        if name not in index:
            raise ValueError(f"{path}:{n}: class {name!r} is not in the labels file")
        _add_unique(records, path, str(n), VideoRecord(video_id, frames_root / video_id, index[name]))
    return _non_empty(records, path)


def parse_trn_list(path: Path, num_classes: int, frames_root: Path) -> list[VideoRecord]:
    """Parse a TRN/TSM list of ``<id> <num_frames> <label_idx>`` lines."""
    _require_file(path, "split file")
    records: dict[str, tuple[str, VideoRecord]] = {}
    for n, line in _numbered_lines(path):
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{path}:{n}: expected '<id> <num_frames> <label_idx>', got {line!r}")
        video_id, frames, label = fields
        _check_video_id(path, str(n), video_id)
        try:
            num_frames, label_idx = int(frames), int(label)
        except ValueError:
            raise ValueError(f"{path}:{n}: num_frames and label_idx must be integers, got {line!r}") from None
        if num_frames < 1:
            raise ValueError(f"{path}:{n}: num_frames must be positive, got {num_frames}")
        if not 0 <= label_idx < num_classes:
            raise ValueError(f"{path}:{n}: label index {label_idx} out of range [0, {num_classes})")
        _add_unique(records, path, str(n), VideoRecord(video_id, frames_root / video_id, label_idx, num_frames))
    return _non_empty(records, path)


def parse_v2_json(path: Path, class_names: Sequence[str], videos_root: Path) -> list[VideoRecord]:
    """Parse an official v2 split json; the class is ``template`` without brackets."""
    data = _read_json_file(path, "split file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of videos")
    index = {name: i for i, name in enumerate(class_names)}
    records: dict[str, tuple[str, VideoRecord]] = {}
    for k, entry in enumerate(data):
        where = f"entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str | int) or "template" not in entry:
            raise ValueError(f"{path}:{where}: expected an object with 'id' and 'template', got {entry!r}")
        video_id = str(entry["id"])
        _check_video_id(path, where, video_id)
        name = str(entry["template"]).replace("[", "").replace("]", "")
        if name not in index:
            raise ValueError(f"{path}:{where}: class {name!r} (id {video_id}) is not in the labels file")
        _add_unique(records, path, where, VideoRecord(video_id, videos_root / f"{video_id}.webm", index[name]))
    return _non_empty(records, path)
