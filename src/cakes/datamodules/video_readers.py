"""Reading videos from disk: jpg frame folders (``00001.jpg ...``) and video files (decord), each
failure a :class:`BadSampleError` naming the file; and the complete per-video checks of
``python -m cakes.check_data``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

#: How a video is stored: a folder of jpg frames, or one video file read with decord.
MediaKind = Literal["frames", "video"]
#: ``(video id, path, frame count from the list or None)`` -> ``(video id, frames decoded, problem or None)``
CheckJob = tuple[str, str, int | None]
CheckResult = tuple[str, int, str | None]

FRAME_NAME = re.compile(r"(\d{5})\.jpg")


class BadSampleError(RuntimeError):
    """A video that cannot be read; the message names the offending file."""


class BadSampleWarning(UserWarning):
    """A bad video was skipped under ``bad_sample="skip"``; the message names the file."""


def count_frames(folder: Path) -> int:
    """Number of frames ``00001.jpg .. 0000N.jpg`` in ``folder``; a gap is a bad sample."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise BadSampleError(f"frame folder missing: {folder}") from None
    numbers = {int(m.group(1)) for m in map(FRAME_NAME.fullmatch, names) if m}
    if not numbers:
        raise BadSampleError(f"no frames named 00001.jpg ... in {folder}")
    if len(numbers) != max(numbers):
        missing = min(set(range(1, max(numbers) + 1)) - numbers)
        raise BadSampleError(f"missing frame: {folder / f'{missing:05d}.jpg'}")
    return len(numbers)


def read_jpeg_frames(folder: Path, indices: np.ndarray) -> np.ndarray:
    """Decode 0-based frame ``indices`` ``(K,)`` of a jpg frame folder -> ``uint8 (K, H, W, 3)``."""
    frames = []
    for i in indices.tolist():
        path = folder / f"{i + 1:05d}.jpg"
        try:
            with Image.open(path) as image:
                frame = np.asarray(image.convert("RGB"))
        except FileNotFoundError:
            raise BadSampleError(f"missing frame: {path}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadSampleError(f"cannot decode frame {path}: {err}") from err
        if frames and frame.shape != frames[0].shape:
            raise BadSampleError(f"frame {path} is {frame.shape[:2]}, earlier frames are {frames[0].shape[:2]}")
        frames.append(frame)
    return np.stack(frames)


class VideoFile:
    """A decord reader of one video file; errors become :class:`BadSampleError`."""

    def __init__(self, path: Path) -> None:
        from decord import DECORDError, VideoReader  # imported lazily: only video files need decord

        self.path, self._decord_error = path, DECORDError
        if not path.is_file():
            raise BadSampleError(f"video missing: {path}")
        try:
            self._reader = VideoReader(str(path), num_threads=1)
            self.num_frames = len(self._reader)
        except (DECORDError, RuntimeError) as err:
            raise BadSampleError(f"cannot open video {path}: {err}") from err
        if self.num_frames < 1:
            raise BadSampleError(f"video has no frames: {path}")

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Decode 0-based frame ``indices`` ``(K,)`` -> ``uint8 (K, H, W, 3)``."""
        try:
            return self._reader.get_batch(indices.tolist()).asnumpy()
        except (self._decord_error, RuntimeError) as err:
            raise BadSampleError(f"cannot decode video {self.path}: {err}") from err


def check_frame_folder(job: CheckJob) -> CheckResult:
    """Decode every jpg of a frame folder: ``(video id, frames decoded, problem or None)``.

    Frames must be numbered without gaps, at least as many as the list says, and all of one size.
    """
    video_id, folder, listed = job
    try:
        found = count_frames(Path(folder))
    except BadSampleError as err:
        return video_id, 0, str(err)
    if listed is not None and listed > found:
        return video_id, 0, f"the list says {listed} frames, {folder} holds {found}"
    size = None
    for i in range(1, found + 1):
        path = Path(folder) / f"{i:05d}.jpg"
        try:
            with Image.open(path) as image:
                image.load()
                frame_size = image.size
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad frame
            return video_id, i - 1, f"cannot decode frame {path}: {err}"
        if size is None:
            size = frame_size
        elif frame_size != size:
            return video_id, i - 1, f"frame {path} is {frame_size}, earlier frames are {size}"
    return video_id, found, None


def check_video_file(job: CheckJob) -> CheckResult:
    """Decode every frame of a video file: ``(video id, frames decoded, problem or None)``."""
    video_id, path, _ = job
    try:
        video = VideoFile(Path(path))
        for start in range(0, video.num_frames, 64):
            video.read(np.arange(start, min(start + 64, video.num_frames)))
    except BadSampleError as err:
        return video_id, 0, str(err)
    return video_id, video.num_frames, None


#: The complete check of one video, by how it is stored.
CHECK_BY_MEDIA = {"frames": check_frame_folder, "video": check_video_file}
