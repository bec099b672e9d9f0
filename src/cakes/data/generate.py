"""Atomic, idempotent generation of an on-disk dataset (shared by the synthetic video and volume sets).

The dataset is written into a temporary sibling folder whose LAST file is a marker json holding the
generation parameters, then renamed into place: a reader sees a complete dataset or none, a killed
generator leaves nothing behind, and a second call with the same parameters returns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def marker_params(root: Path, marker: str) -> dict[str, Any] | None:
    """The parameters a complete dataset at ``root`` was generated with (``None`` if none)."""
    try:
        return json.loads((root / marker).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def generate_atomically(root: Path, marker: str, params: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` (which must not write the marker) and publish it as ``root``.

    Raises ``FileExistsError`` naming what ``root`` holds when it is non-empty and not a dataset
    generated with ``params``.
    """
    existing = marker_params(root, marker)
    if existing == params:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if existing is None:
            found = f"other files (no {marker})"
        else:
            found = "a synthetic dataset with " + ", ".join(
                f"{k}={existing.get(k)} (requested {v})" for k, v in params.items() if existing.get(k) != v
            )
        raise FileExistsError(f"{root} holds {found}; use another root or delete it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, root)  # atomic; replaces an empty root folder
        except OSError:
            if marker_params(root, marker) != params:  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
