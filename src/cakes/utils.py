"""Leaf helpers with no dependency on the rest of ``cakes``: plain-data conversion, where the
project's ``conf/`` lives, pure seeds, the git commit of the running code, the processor it runs
on, and restoring an environment variable after a block.

Nothing here imports from ``cakes``, so any module may import it without creating a cycle.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def plain(cfg: Any) -> Any:
    """OmegaConf node -> plain python containers (resolved); anything else passes through."""
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def conf_dir() -> Path:
    """The project's ``conf/``, found as ``train.py`` finds it: ``$CAKES_CONF_DIR`` if set; else, when
    the current directory is a working copy (``train.py`` next to ``conf/train.yaml``), its
    ``conf/`` — the one ``python train.py`` run there composes; else the tree next to ``src/``."""
    env = os.environ.get("CAKES_CONF_DIR")
    cwd = Path.cwd()
    if env:
        path = Path(env)
    elif (cwd / "train.py").is_file() and (cwd / "conf" / "train.yaml").is_file():
        path = cwd / "conf"
    else:
        path = Path(__file__).resolve().parents[2] / "conf"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"cannot find the cakes configs (train.yaml) in {path}; set CAKES_CONF_DIR")
    return path


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (process- and platform-independent), e.g.
    ``mix_seed(seed, epoch, index)`` for a sample's augmentation or ``mix_seed(seed, rank, epoch,
    batch)`` for a supernet's sampling: a resumed run draws what an uninterrupted one would, with no
    generator state to save."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def git_commit(cwd: Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty`` of the code being run, ``unknown`` outside a checkout."""
    where = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), e.g.
    ``AMD EPYC`` or ``Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz``: benchmark figures belong to it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_text() -> str:
    """What a timing depends on, for a benchmark's header: processor, the vector ISA PyTorch's CPU
    kernels use, torch version, threads and the git commit (:func:`git_commit`), e.g. ``AMD EPYC (AVX2),
    torch 2.13.0+cpu, 2 threads, commit <40-hex sha>[-dirty]``."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} ({isa}), torch {torch.__version__}, {torch.get_num_threads()} threads, commit {git_commit()}"


@contextmanager
def env_restored(name: str) -> Iterator[None]:
    """Restore environment variable ``name`` to what it was (set or unset) when the block exits."""
    previous = os.environ.get(name)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
