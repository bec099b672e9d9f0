"""Finding architectures by name for a run: ``arch=<name>`` in a config, the ``arch_data`` resolver,
and the check of a run's arch before anything is instantiated.

The arch schema, reading and writing are :mod:`cakes.ops.arch` (the operators consume it).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cakes.builders import builder
from cakes.ops.arch import ArchError, load_arch
from cakes.utils import conf_dir


def find_arch(name: str | os.PathLike, arch_dir: str | os.PathLike | None = None) -> Path:
    """Where ``arch=<name>`` points: an existing yaml path, else ``<arch_dir>/arch/<name>.yaml``
    (exported by searches), else ``archs/<name>.yaml`` (the published presets, next to ``conf/``).

    Arch files are read by :func:`cakes.ops.arch.load_arch` as plain data — never composed by Hydra, so a file
    cannot carry ``# @package`` directives, ``defaults`` or Hydra settings into a run.
    """
    given = Path(name).expanduser()
    if given.suffix in (".yaml", ".yml") and given.is_file():
        return given
    folders = ([Path(arch_dir) / "arch"] if arch_dir else []) + [conf_dir().parent / "archs"]
    for folder in folders:
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise FileNotFoundError(
        f"arch {str(name)!r} not found in {[str(f) for f in folders]} (nor as a yaml path); known: {known}"
    )


def arch_data(name: str | None, arch_dir: str | None = None) -> dict[str, Any]:
    """OmegaConf resolver ``${arch_data:${arch},${paths.arch_dir}}``: the validated arch as plain
    data, so configs and checkpoints carry the whole architecture."""
    if name in (None, "", "null", "None"):
        raise ArchError(
            "operator=cakes needs an architecture: add arch=<name> (found/arch/ or archs/) or arch=/path/to/arch.yaml"
        )
    return load_arch(find_arch(name, arch_dir)).to_dict()


def check_arch(cfg: DictConfig) -> None:
    """Arch files are data: when the run names one (``arch=<name>`` or a path), find it and validate
    its schema (no ``_target_`` or other Hydra keys, no unknown keys) before anything is instantiated.
    The file is read by :func:`cakes.ops.arch.load_arch`, never composed by Hydra."""
    name = cfg.get("arch")
    if name in (None, "", "???"):
        return
    path = find_arch(str(name), cfg.paths.arch_dir)
    arch = load_arch(path)
    # a found architecture for this backbone: check its layers and widths now, naming the file
    operator, backbone = cfg.get("operator") or {}, cfg.get("backbone") or {}
    if operator.get("_target_") in ("cakes.ops.Derived", "cakes.ops.factory.Derived"):
        cls = builder(str(backbone.get("_target_")))
        if cls is not None and hasattr(cls, "slots"):
            params = inspect.signature(cls.slots).parameters
            arch.check_backbone(
                cls.name, cls.slots(**{k: backbone[k] for k in params if k in backbone}), source=str(path)
            )
