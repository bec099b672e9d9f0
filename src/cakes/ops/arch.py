"""Found architectures: the per-layer sub-kernel counts that a search exports and a retrain reads —
the schema, reading and writing (finding an arch by name: :mod:`cakes.arch`).

An arch file is plain yaml data, never instantiated::

    backbone: resnet3d        # the backbone it applies to
    op_set: c123d             # op-set name or list of sub-kernels
    layers:                   # one entry per replaceable conv, in module order
      layer1.0: {3x3x3: 28, 1x3x3: 35, 3x1x1: 1}
      ...
    meta: {...}               # provenance: free-form data (search mode, lasso, epoch, commit, ...)

Within a layer, output channels are grouped in the order the counts are listed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cakes.files import write_atomic
from cakes.ops.subkernel import OpSet, SubKernel, parse_counts, resolve_op_set
from cakes.utils import plain

ARCH_KEYS = ("backbone", "op_set", "layers", "meta")


class ArchError(ValueError):
    """An arch file or mapping does not fit the schema or the backbone."""


@dataclass
class Arch:
    """A validated per-layer configuration (see module docstring)."""

    backbone: str
    op_set: str | list[str]
    layers: dict[str, dict[str, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "op_set": self.op_set,
            "layers": {name: dict(c) for name, c in self.layers.items()},
            "meta": self.meta,
        }

    def check_backbone(self, backbone: str, slots: Mapping[str, int], source: str = "arch") -> None:
        """Validate against a backbone's replaceable slots ``{layer name: output width}``.

        Raises ``ArchError`` naming the layer and the numbers when the backbone differs, a layer is
        missing or unexpected, or a layer's counts do not sum to its width.
        """
        if self.backbone != backbone:
            raise ArchError(f"{source}: written for backbone {self.backbone!r}, but the model is {backbone!r}")
        missing = [n for n in slots if n not in self.layers]
        extra = [n for n in self.layers if n not in slots]
        if missing or extra:
            raise ArchError(
                f"{source}: layers do not match the {backbone} backbone ({len(self.layers)} given, {len(slots)} "
                f"expected); missing: {missing or 'none'}; unexpected: {extra or 'none'}"
            )
        for name, width in slots.items():
            total = sum(self.layers[name].values())
            if total != width:
                raise ArchError(
                    f"{source}: layer {name!r} counts {self.layers[name]} sum to {total}, but the layer has {width} "
                    "output channels"
                )


def reject_hydra_keys(value: Any, where: str) -> None:
    """``ArchError`` naming the key path when any key of ``value`` is a Hydra key (``_target_``, ...)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
                raise ArchError(f"{where}: key {key!r} is not allowed in an arch file (arch files are data)")
            reject_hydra_keys(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            reject_hydra_keys(item, f"{where}[{i}]")


def parse_layers(layers: Any, op_set: OpSet, source: str) -> dict[str, dict[str, int]]:
    """An arch's ``layers`` as ``{layer name: {sub-kernel name: count}}``, every sub-kernel checked to
    be in ``op_set``; ``ArchError`` naming ``source`` and the layer otherwise."""
    allowed = {sub.size for sub in op_set}
    if not isinstance(layers, Mapping) or not layers:
        raise ArchError(f"{source}: 'layers' must be a non-empty mapping of layer name -> counts")
    parsed: dict[str, dict[str, int]] = {}
    for name, counts in layers.items():
        where = f"{source}: layer {name!r}"
        try:
            groups = parse_counts(counts, where=where)
        except ValueError as err:
            raise ArchError(str(err) if str(err).startswith(source) else f"{where}: {err}") from None
        for sub, _ in groups:
            if sub.size not in allowed:
                raise ArchError(f"{where}: sub-kernel {sub.name!r} is not in op set {op_set.name} {list(op_set.names)}")
        parsed[str(name)] = {sub.name: n for sub, n in groups}
    return parsed


def arch_from_mapping(data: Any, source: str = "arch") -> Arch:
    """Validate the schema of plain data and build an :class:`Arch` (no backbone check)."""
    data = plain(data)
    if not isinstance(data, Mapping):
        raise ArchError(f"{source}: expected a mapping with keys {list(ARCH_KEYS)}, got {type(data).__name__}")
    reject_hydra_keys(data, source)
    unknown = [k for k in data if k not in ARCH_KEYS]
    if unknown:
        raise ArchError(f"{source}: unknown keys {unknown}; an arch has only {list(ARCH_KEYS)}")
    for key in ("backbone", "op_set", "layers"):
        if key not in data:
            raise ArchError(f"{source}: missing key {key!r}")
    if not isinstance(data["backbone"], str):
        raise ArchError(f"{source}: 'backbone' must be a string, got {data['backbone']!r}")
    op_set_spec = data["op_set"]
    try:
        op_set = resolve_op_set(op_set_spec)
    except ValueError as err:
        raise ArchError(f"{source}: op_set: {err}") from None
    parsed = parse_layers(data["layers"], op_set, source)
    meta = data.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise ArchError(f"{source}: 'meta' must be a mapping, got {meta!r}")
    spec = op_set_spec if isinstance(op_set_spec, str) else [SubKernel.parse(n).name for n in op_set_spec]
    return Arch(backbone=data["backbone"], op_set=spec, layers=parsed, meta=dict(meta))


def load_arch(source: str | os.PathLike | Mapping | Arch) -> Arch:
    """Read an arch from a yaml file path or an already-composed mapping, as plain data, and
    validate its schema. Use :meth:`Arch.check_backbone` to validate it against a model."""
    if isinstance(source, Arch):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"arch file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ArchError(
                f"{path}: not text: an arch file must be a UTF-8 YAML file (undecodable byte at offset {err.start})"
            ) from None
        except yaml.YAMLError as err:
            raise ArchError(f"{path}: not valid yaml: {err}") from None
        return arch_from_mapping(data, source=str(path))
    return arch_from_mapping(source)


def save_arch(arch: Arch, path: str | os.PathLike, header: str = "", exclusive: bool = False) -> Path:
    """Write ``arch`` atomically with the umask-based mode (:func:`cakes.files.write_atomic`).
    ``exclusive``: never replace an existing file (``FileExistsError`` naming it)."""
    text = yaml.safe_dump(arch.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return write_atomic(Path(path), text, exclusive=exclusive)
