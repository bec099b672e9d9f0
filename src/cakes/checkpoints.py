"""Checkpoints: finding the one to resume from (a kill during a write leaves an incomplete file,
skipped), and reading a network's weights out of one strictly.

Checkpoint contents are plain data (tensors, numbers, strings, lists, dicts), so they load
with ``torch.load(..., weights_only=True)`` — the default of torch 2.6+.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

log = logging.getLogger(__name__)

#: file patterns that hold a resumable state: our checkpoints and Lightning's SLURM requeue saves
CHECKPOINT_GLOBS = ("checkpoints/*.ckpt", "hpc_ckpt_*.ckpt")


def is_complete_checkpoint(path: Path) -> bool:
    """A torch zip checkpoint whose central directory reads (a truncated write does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The most recently written complete checkpoint of ``run_dir`` (``checkpoints/*.ckpt`` and
    Lightning's ``hpc_ckpt_*.ckpt``), or ``None``. Incomplete files (a kill during a write) are
    skipped with a warning."""
    run_dir = Path(run_dir)
    candidates = {p for pattern in CHECKPOINT_GLOBS for p in run_dir.glob(pattern) if p.is_file()}
    # newest first; at equal times prefer last.ckpt (it is written after the named checkpoint)
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True):
        if is_complete_checkpoint(path):
            return path
        log.warning("resume: skipping incomplete checkpoint %s", path)
    return None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike[str]) -> str | None:
    """``resume``: null (start fresh), ``auto`` (the newest checkpoint of this run directory,
    fresh start if there is none), or a checkpoint path (must exist)."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        found = newest_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting from scratch", run_dir)
            return None
        log.info("resume=auto: continuing from %s", found)
        return str(found)
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"resume: checkpoint not found: {path} (use resume=auto to pick the newest checkpoint of the run directory)"
        )
    return str(path)


def key_problems(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected``."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    return (
        ([f"missing keys: {missing}"] if missing else [])
        + ([f"unexpected keys: {unexpected}"] if unexpected else [])
        + shapes
    )


def load_strict(net: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``net``: every key of each side must be on the other with the same shape
    (``num_batches_tracked`` included), else ``ValueError`` naming ``source`` and the keys."""
    problems = key_problems(net.state_dict(), state)
    if problems:
        raise ValueError(f"{source} does not fit the network:\n  " + "\n  ".join(problems))
    net.load_state_dict(dict(state), strict=True)


def network_state(checkpoint: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """The network's tensors of a project checkpoint (``state_dict`` keys under ``net.``)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{source}: not a cakes checkpoint (no 'state_dict' entry)")
    other = [k for k in state if not k.startswith("net.")]
    if other:
        raise ValueError(f"{source}: state_dict keys outside the network ('net.'): {other[:5]}")
    return {k.removeprefix("net."): v for k, v in state.items()}
