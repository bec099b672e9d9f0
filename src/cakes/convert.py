"""Checkpoints of the authors' code (github.com/yucornetto/CAKES) to and from this project's.

Command line::

    python -m cakes.convert authors SRC DST arch=<name|yaml> [train.py overrides]
    python -m cakes.convert to-authors SRC DST

``authors``: ``SRC`` is their ``.pth`` / ``.pth.tar`` (a state dict, or a dict with a
``state_dict`` entry; ``module.`` prefix or not), read with ``torch.load(weights_only=True)``. The
network is built from the train config (``experiment=ssv1_cakes`` unless overridden) with the given
overrides, every tensor is mapped strictly, and ``DST`` is a self-describing checkpoint that
``VideoClassificationModule.load_from_checkpoint`` and ``python train.py ... init=DST`` accept.
``to-authors`` maps a checkpoint of ours (a ResNet3d with ``CakesConv3d`` slots) back.

Key layout (their ``TemporalModel`` around ``I3D.ResNet``, ``conv1_2d`` / ``conv2_3d`` /
``conv1_2_3d`` ops, saved from ``DataParallel``) → ours::

    module.base_model.<stem, layerS.B.{conv1,bn1,conv3,bn3,downsample}>.*  →  same names
    module.base_model.layerS.B.convT.convs.<i>.0.weight  →  layerS.B.conv2.conv.weights.<sub-kernel>
    module.base_model.layerS.B.convT.out.0.*             →  layerS.B.conv2.norm.*
    module.new_fc.{weight,bias}                          →  fc.{weight,bias}

``convs.<i>`` is the i-th NON-EMPTY group in their fixed order 3x3x3, 1x3x3, 3x1x1 (a group with no
channels has no conv, so the indices shift); its kernel shape names the sub-kernel, its rows are
that group's output channels in order, and the BN covers the groups concatenated in that order.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cakes.ops.arch import Arch

#: the order in which the authors' ops append their per-sub-kernel convs (kxkxk, 1xkxk, kx1x1)
AUTHORS_GROUP_ORDER = ("3x3x3", "1x3x3", "3x1x1")
AUTHORS_FORMAT = "authors (github.com/yucornetto/CAKES)"

_GROUP_CONV = re.compile(r"^base_model\.(layer\d+\.\d+)\.convT\.convs\.(\d+)\.0\.weight$")
_GROUP_NORM = re.compile(r"^base_model\.(layer\d+\.\d+)\.convT\.out\.0\.(\w+)$")
_OUR_CONV = re.compile(r"^(layer\d+\.\d+)\.conv2\.conv\.weights\.(\w+)$")
_OUR_NORM = re.compile(r"^(layer\d+\.\d+)\.conv2\.norm\.(\w+)$")


def read_authors_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], bool, dict[str, Any] | None]:
    """``(state without 'module.', whether it had that prefix, the dict's other entries (epoch, arch,
    best_prec1) or None for a bare state dict)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"authors' checkpoint not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    entries = None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        entries = {k: v for k, v in data.items() if k != "state_dict"}
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a dict with a 'state_dict' entry)")
    prefixed = [k.startswith("module.") for k in data]
    if any(prefixed) and not all(prefixed):
        raise ValueError(
            f"{path}: some keys start with 'module.' and some do not, e.g. "
            f"{[k for k, p in zip(data, prefixed, strict=True) if not p][:3]}"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}, all(prefixed), entries


def _subkernel_of(weight: Tensor) -> str:
    return "x".join(str(s) for s in weight.shape[2:])


def _authors_index(layer: str, counts: Mapping[str, int]) -> dict[str, int]:
    """``{sub-kernel: i}`` of a layer's non-empty groups (``counts`` in our channel order), checked to
    be the authors' order (else the BN entries and conv3 inputs would need a permutation)."""
    subs = [s for s, n in counts.items() if n]
    unknown = [s for s in subs if s not in AUTHORS_GROUP_ORDER]
    if unknown:
        raise ValueError(
            f"layer {layer}: sub-kernels {unknown} have no conv in the authors' network "
            f"(their video ops hold {list(AUTHORS_GROUP_ORDER)})"
        )
    expected = sorted(subs, key=AUTHORS_GROUP_ORDER.index)
    if subs != expected:
        raise ValueError(
            f"layer {layer}: channels are grouped as {subs}, the authors' network groups them "
            f"as {expected}; list the arch's counts in that order"
        )
    return {s: i for i, s in enumerate(subs)}


def ours_to_authors(state: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """Our ResNet3d state (``CakesConv3d`` slots with ``arch``'s counts) → the authors' key layout,
    without ``module.``. Raises ``ValueError`` naming the key or layer when a slot is not a
    ``CakesConv3d`` of their sub-kernels or groups its channels in another order."""
    index = {layer: _authors_index(layer, counts) for layer, counts in arch.layers.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        conv, norm = _OUR_CONV.match(key), _OUR_NORM.match(key)
        if conv and conv[2] in index.get(conv[1], {}):
            out[f"base_model.{conv[1]}.convT.convs.{index[conv[1]][conv[2]]}.0.weight"] = value
        elif norm:
            out[f"base_model.{norm[1]}.convT.out.0.{norm[2]}"] = value
        elif ".conv2." in key:
            raise ValueError(
                f"{key}: not a group of the arch's CakesConv3d slot; only operator=cakes networks "
                "have an authors' equivalent"
            )
        elif key.startswith("fc."):
            out[f"new_fc.{key.removeprefix('fc.')}"] = value
        else:
            out[f"base_model.{key}"] = value
    return out


def check_groups(state: Mapping[str, Tensor], arch: Arch, source: str) -> None:
    """Each layer's authors' groups (``convT.convs.<i>``: sub-kernel from the kernel shape, width from
    the rows) must be the arch's non-empty counts in the authors' order; ``ValueError`` naming the
    layer otherwise."""
    found: dict[str, dict[int, tuple[str, int]]] = {}
    for key, value in state.items():
        match = _GROUP_CONV.match(key)
        if match:
            found.setdefault(match[1], {})[int(match[2])] = (_subkernel_of(value), int(value.shape[0]))
    problems = []
    for layer, counts in arch.layers.items():
        _authors_index(layer, counts)
        expected = [(s, n) for s, n in counts.items() if n]
        groups = found.get(layer, {})
        if sorted(groups) != list(range(len(groups))) or [groups[i] for i in sorted(groups)] != expected:
            have = ", ".join(f"convs.{i} {s}×{n}" for i, (s, n) in sorted(groups.items())) or "no groups"
            want = ", ".join(f"convs.{i} {s}×{n}" for i, (s, n) in enumerate(expected))
            problems.append(f"layer {layer}: checkpoint has {have}; the arch gives {want}")
    if problems:
        raise ValueError(f"{source}: group widths do not match the arch:\n  " + "\n  ".join(problems))


def authors_to_ours(state: Mapping[str, Tensor], net: nn.Module, arch: Arch, source: str) -> dict[str, Tensor]:
    """Map an authors' state (no ``module.``) onto ``net``'s keys, strictly: group widths against
    ``arch`` (by layer), then keys and shapes against ``net``, named in the authors' terms."""
    from cakes.checkpoints import key_problems

    check_groups(state, arch, source)
    own = net.state_dict()
    theirs = ours_to_authors(own, arch)  # their key for each of our tensors, in our order
    problems = key_problems(theirs, state)
    if problems:
        raise ValueError(
            f"{source} does not fit the network of this arch (keys without 'module.'):\n  " + "\n  ".join(problems)
        )
    return {ours: state[a] for ours, a in zip(own, theirs, strict=True)}


def _save(checkpoint: Mapping[str, Any], path: Path) -> None:
    from cakes.files import write_atomic

    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def convert_authors(src: str | Path, dst: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Authors' checkpoint → a checkpoint of ours for the network the train config (with
    ``overrides``, which must name ``arch=``) builds. Returns ``dst``."""
    import pytorch_lightning as pl
    from cakes.builders import build_model

    from cakes.arch import find_arch
    from cakes.ops.arch import load_arch
    from cakes.config import compose_train_config

    overrides = list(overrides)
    arch_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("arch=")), None)
    if not arch_name:
        raise ValueError("convert authors: name the architecture of the checkpoint, e.g. arch=ssv1_cakes123d_p")
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=ssv1_cakes")
    cfg = compose_train_config(overrides)
    arch = load_arch(find_arch(arch_name, cfg.paths.arch_dir))
    state, module_prefix, entries = read_authors_checkpoint(src)
    cfg.backbone.pretrained = None  # every weight comes from the checkpoint
    module = build_model(cfg.model)
    mapped = authors_to_ours(state, module.net, arch, str(src))
    module.net.load_state_dict(mapped, strict=True)
    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["cakes"]["converted_from"] = {
        "format": AUTHORS_FORMAT,
        "file": str(src),
        "module_prefix": module_prefix,
        "entries": entries,
    }
    _save(checkpoint, Path(dst))
    return Path(dst)


def convert_to_authors(src: str | Path, dst: str | Path) -> Path:
    """A checkpoint of ours → the authors' format ``{'epoch', 'arch', 'state_dict', 'best_prec1'}``
    (``module.`` keys). A checkpoint converted from theirs gets its original entries and prefix back."""
    from cakes.ops.arch import load_arch
    from cakes.checkpoints import network_state

    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    operator = (checkpoint.get("hyper_parameters") or {}).get("net", {}).get("operator", {})
    if operator.get("_target_") != "cakes.ops.Derived":
        raise ValueError(
            f"{src}: only checkpoints of operator=cakes networks (CakesConv3d slots) have an authors' "
            f"equivalent; this one's operator is {operator.get('_target_')!r}"
        )
    state = ours_to_authors(network_state(checkpoint, str(src)), load_arch(operator["arch"]))
    origin = (checkpoint.get("cakes") or {}).get("converted_from")
    if origin:  # back to the source's own layout
        prefix, entries = ("module." if origin["module_prefix"] else ""), origin["entries"]
    else:
        prefix, entries = "module.", {"epoch": checkpoint.get("epoch", 0), "arch": "resnet50", "best_prec1": None}
    theirs = {prefix + k: v for k, v in state.items()}
    out = theirs if entries is None else {**entries, "state_dict": theirs}
    _save(out, Path(dst))
    return Path(dst)


USAGE = """usage:
  python -m cakes.convert authors SRC DST arch=<name|yaml> [train.py overrides, e.g. data.num_frames=16]
  python -m cakes.convert to-authors SRC DST"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring). Returns the exit status; errors are one message."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] not in ("authors", "to-authors") or (args[0] == "to-authors" and len(args) != 3):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        if args[0] == "authors":
            out = convert_authors(args[1], args[2], args[3:])
        else:
            out = convert_to_authors(args[1], args[2])
    except (ValueError, FileNotFoundError) as err:
        print(f"cakes.convert: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
