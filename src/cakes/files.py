"""How the project writes every file: atomically, with the usual umask-based mode.

A reader never sees a half-written file (a temporary file in the same folder, flushed and fsynced,
then renamed over the target), and the file gets the mode any other program would give it
(``0o666 & ~umask``: e.g. ``0644`` under umask ``022``, ``0664`` under ``002``; a temporary file
from :func:`tempfile.mkstemp` would stay ``0600``, unreadable for the rest of a group sharing
``found/`` or ``logs/``).

``exclusive=True`` creates the target only if it does not exist yet — checked and created in one
step by the file system (a hard link of the finished temporary file), so two jobs writing the same
name at once can never overwrite each other: the second gets :class:`FileExistsError` naming the
file.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: the mode asked for when creating a file; the kernel clears the umask's bits
FILE_MODE = 0o666


def temp_path(path: Path, suffix: str = "") -> Path:
    """A fresh hidden name next to ``path`` (``.<name>.<pid>.<random>.tmp<suffix>``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def _publish(tmp: Path, path: Path, exclusive: bool) -> None:
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: check and create in one step
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{path} already exists and was not overwritten", str(path)) from None
    except OSError:  # a file system without hard links: reserve the name exclusively, then fill it
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{path} already exists and was not overwritten", str(path)) from None
        os.replace(tmp, path)


@contextmanager
def atomic_output(path: str | os.PathLike[str], *, exclusive: bool = False, suffix: str = "") -> Iterator[Path]:
    """For writers that want a file name (``savefig``, ``nib.save``, ONNX ``save``): yields a
    temporary path in ``path``'s folder (ending in ``suffix``, for writers that pick the format by
    the name); when the block succeeds it becomes ``path`` (see the module docstring for
    ``exclusive``). The temporary file is removed in every case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        _publish(tmp, path, exclusive)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, exclusive: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically with the umask-based mode; returns
    ``path``. ``exclusive``: raise :class:`FileExistsError` naming ``path`` instead of replacing it."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_output(path, exclusive=exclusive) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
    return path
