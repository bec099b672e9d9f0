"""The only callables a network config may name: the project's own network builders.

A network config (``model.net``: a backbone with its operator factory) is stored in every checkpoint
and rebuilt from there by ``load_from_checkpoint``, ``init=``, ``python -m cakes.export ckpt=`` and
the inheritance of a supernet's weights. A checkpoint may come from anywhere, so the config is
checked, recursively and before anything is built, against :data:`NETWORK_BUILDERS`; any other
``_target_`` (``os.makedirs``, ``builtins.exec``, a class of another package, ...) is an
:class:`UntrustedBuilderError` naming the key path and the target. The allowed builders are then
called directly by :func:`build` — not by Hydra's ``instantiate``, which would import any dotted
name and resolve ``${...}`` interpolations inside the data (arch files are data).

To add a backbone or operator factory of your own, put it under ``cakes.`` and add its
``_target_`` (as the configs spell it; both spellings if it is also re-exported) to
:data:`NETWORK_BUILDERS`; a backbone follows the contract of :mod:`cakes.backbones.base`.

:func:`build_network` is the entry point for a network config (ImageNet path optionally dropped),
:func:`build_model` for a run's LightningModule (whose ``net`` is built the same way).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from cakes.utils import plain

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule

#: ``_target_`` values a network config (and so a checkpoint) may name
NETWORK_BUILDERS: frozenset[str] = frozenset(
    {
        # backbones
        "cakes.backbones.ResNet3d",
        "cakes.backbones.resnet3d.ResNet3d",
        "cakes.backbones.C2FNAS",
        "cakes.backbones.c2fnas.C2FNAS",
        # operator factories (fixed, found, uniform, per-layer)
        "cakes.ops.Homogeneous",
        "cakes.ops.factory.Homogeneous",
        "cakes.ops.Derived",
        "cakes.ops.factory.Derived",
        "cakes.ops.Uniform",
        "cakes.ops.factory.Uniform",
        "cakes.ops.PerLayer",
        "cakes.ops.per_layer.PerLayer",
        # search-time operator factories (supernets)
        "cakes.ops.CostPriority",
        "cakes.ops.search.CostPriority",
        "cakes.ops.PerformancePriority",
        "cakes.ops.search.PerformancePriority",
    }
)
#: the instantiation keys a builder node may carry besides its arguments
BUILDER_KEYS = ("_target_", "_recursive_", "_convert_", "_args_")


class UntrustedBuilderError(ValueError):
    """A network config names a callable that is not one of the project's builders."""


def check_builders(spec: Any, where: str = "net") -> None:
    """Raise :class:`UntrustedBuilderError` naming the key path when any node of ``spec`` has a
    ``_target_`` outside :data:`NETWORK_BUILDERS` or an instantiation key other than
    :data:`BUILDER_KEYS` (``_partial_``, ...). Nothing is imported or called."""
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            name = str(key)
            if name == "_target_":
                if not isinstance(value, str) or value not in NETWORK_BUILDERS:
                    raise UntrustedBuilderError(
                        f"{where}._target_: {value!r} is not one of the project's network builders; refusing to "
                        f"build it (a config or checkpoint may only name cakes.builders.NETWORK_BUILDERS: "
                        f"{sorted(t for t in NETWORK_BUILDERS if t.count('.') == 2)})"
                    )
            elif name.startswith("_") and name.endswith("_") and name not in BUILDER_KEYS:
                raise UntrustedBuilderError(f"{where}.{name}: instantiation key not allowed in a network config")
            check_builders(value, f"{where}.{name}")
    elif isinstance(spec, (list, tuple)):
        for i, item in enumerate(spec):
            check_builders(item, f"{where}[{i}]")


def _resolve(target: str) -> Any:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def builder(target: str) -> Any | None:
    """The class or function an allowed ``_target_`` names (``None`` for any other target)."""
    return _resolve(target) if target in NETWORK_BUILDERS else None


def _build(node: Any) -> Any:
    if isinstance(node, Mapping):
        if "_target_" not in node:
            return {k: _build(v) for k, v in node.items()}
        recursive = bool(node.get("_recursive_", True))
        args = [(_build(a) if recursive else a) for a in node.get("_args_", ())]
        kwargs = {k: (_build(v) if recursive else v) for k, v in node.items() if k not in BUILDER_KEYS}
        return _resolve(node["_target_"])(*args, **kwargs)
    if isinstance(node, (list, tuple)):
        return [_build(v) for v in node]
    return node


def build(spec: Mapping[str, Any], where: str = "net") -> Any:
    """Check ``spec`` (plain data) with :func:`check_builders`, then call its builders, innermost
    first (a node with ``_recursive_: false`` gets its arguments as plain data)."""
    check_builders(spec, where)
    return _build(spec)


def build_network(net: Mapping[str, Any], pretrained: bool = True) -> nn.Module:
    """Build a network config (``_target_`` tree: backbone with its operator factory).

    Only the project's own builders may be named (:data:`cakes.builders.NETWORK_BUILDERS`, checked
    before anything is built): the config may come from a checkpoint of unknown origin.
    ``pretrained=False`` drops any ImageNet path (for counting, or when a checkpoint will
    supply the weights).
    """
    spec = dict(plain(net))
    if not pretrained and "pretrained" in spec:
        spec["pretrained"] = None
    return build(spec, "net")


def build_model(model: Any) -> LightningModule:
    """The LightningModule of a config's ``model`` node (``_target_`` and its arguments).

    The node is resolved exactly once, into plain data, before the module sees it. Hydra's
    ``instantiate`` would resolve it in place and the module would resolve it again: a ``${...}``
    written in an arch file (escaped by the ``arch_data`` resolver, arch files are data) would then
    be interpolated after all, into the config the checkpoint stores.
    """
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    target = spec.pop("_target_")
    for key in ("_recursive_", "_convert_"):
        spec.pop(key, None)
    return get_class(target)(**spec)
