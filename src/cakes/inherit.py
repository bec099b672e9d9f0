"""Retrain from inherited supernet weights: ``python train.py operator=cakes arch=<found>
init=supernet:<search checkpoint>``.

The derived network (a ResNet3d whose slots are ``CakesConv3d`` with the found counts) takes, for each
slot, every kept (op, channel)'s weights and BN entries from the supernet, and its next conv (the
bottleneck's ``conv3``) the matching input columns. Everything else (stem, 1x1 convs, other BNs,
downsample, fc) is copied as is; every tensor of the derived network is fed, strictly.

* Performance-priority slots: the slot's own :meth:`~cakes.ops.search.PerformancePrioritySlot.derive`
  (its eval selection) with ``supernet_eval(x)[:, order] == derived(x)``; ``conv3`` takes the columns
  ``order``. The derived network's eval forward equals the supernet's.
* Cost-priority slots: the top-``C_out`` pairs of ``|γ|`` (``layer_topk``, the authors' selection);
  ``conv3`` takes the columns of the kept entries ``k·C_out + c``. The derived network's eval forward
  equals that of the supernet whose dropped paths are masked (``γ = β = 0``: zero after BN and ReLU).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from cakes.builders import build_network
from cakes.checkpoints import load_strict, network_state
from cakes.ops.conv import CakesConv3d
from cakes.ops.factory import ConvNorm
from cakes.ops.search import CostPrioritySlot, PerformancePrioritySlot, SearchSlot

log = logging.getLogger(__name__)

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def kept_paths(slot: SearchSlot) -> dict[str, dict[str, Tensor]]:
    """Per sub-kernel with kept channels: ``conv`` ``(n, C_in, *size)``, the BN tensors ``(n,)``
    and ``columns`` ``(n,)``, the next conv's input columns that read those channels in the supernet."""
    groups: dict[str, dict[str, Tensor]] = {}
    if isinstance(slot, PerformancePrioritySlot):
        derived, order = slot.derive()
        start = 0
        for name, n in derived.conv.counts.items():
            if n:
                rows = slice(start, start + n)
                groups[name] = {
                    "conv": derived.conv.weights[name].detach(),
                    "columns": order[rows],
                    **{t: getattr(derived.norm, t)[rows].detach() for t in NORM_TENSORS},
                }
                start += n
        return groups
    if not isinstance(slot, CostPrioritySlot):
        raise TypeError(f"layer {slot.layer}: unknown supernet slot {type(slot).__name__}")
    ops, channels = slot.select("layer_topk")
    for k, name in enumerate(slot.op_set.names):
        chans = channels[ops == k]
        if chans.numel():
            entries = k * slot.width + chans
            groups[name] = {
                "conv": slot.candidates.weights[name].detach()[chans],
                "columns": entries,
                **{t: getattr(slot.norm, t).detach()[entries] for t in NORM_TENSORS},
            }
    return groups


def inherited_state(derived: nn.Module, supernet: nn.Module) -> dict[str, Tensor]:
    """The derived network's full state dict built from ``supernet`` (see the module docstring).

    Raises ``ValueError`` naming the layer when the supernet's kept counts differ from the derived
    network's (an arch from another selection rule or another checkpoint), or when a slot has no
    ``conv3`` after it (only ResNet bottleneck networks are supported)."""
    modules = dict(derived.named_modules())
    state = supernet.state_dict()
    out: dict[str, Tensor] = {}
    for path, slot in supernet.named_modules():
        if not isinstance(slot, SearchSlot):
            continue
        target = modules.get(path)
        if not (isinstance(target, ConvNorm) and isinstance(target.conv, CakesConv3d)):
            raise ValueError(f"init=supernet: {path} of the network is not a CakesConv3d slot (operator=cakes)")
        next_conv = path.removesuffix("conv2") + "conv3"
        if not path.endswith(".conv2") or not isinstance(modules.get(next_conv), nn.Conv3d):
            raise ValueError(
                f"init=supernet: slot {path} has no conv3 after it; inheriting supports ResNet bottleneck networks"
            )
        groups = kept_paths(slot)
        kept = {name: int(g["conv"].shape[0]) for name, g in groups.items()}
        wanted = {name: n for name, n in target.conv.counts.items() if n}
        if kept != wanted:
            raise ValueError(
                f"init=supernet: layer {slot.layer}: the supernet keeps {kept}, the arch gives {wanted} "
                "(was the arch exported from this checkpoint with the same selection rule?)"
            )
        order = list(wanted)
        for name in order:
            out[f"{path}.conv.weights.{name}"] = groups[name]["conv"]
        for t in NORM_TENSORS:
            out[f"{path}.norm.{t}"] = torch.cat([groups[name][t] for name in order])
        out[f"{path}.norm.num_batches_tracked"] = state[f"{path}.norm.num_batches_tracked"]
        columns = torch.cat([groups[name]["columns"] for name in order])
        out[f"{next_conv}.weight"] = state[f"{next_conv}.weight"][:, columns.to(state[f"{next_conv}.weight"].device)]
    for key in derived.state_dict():
        if key not in out and key in state:
            out[key] = state[key]
    return out


def inherit(derived: nn.Module, supernet: nn.Module) -> None:
    """Load :func:`inherited_state` into ``derived`` strictly."""
    load_strict(derived, inherited_state(derived, supernet), "init=supernet")


def inherit_from_checkpoint(derived: nn.Module, path: str | Path) -> None:
    """Rebuild the supernet of a search checkpoint (its stored network config, no ImageNet file),
    load its weights strictly, and :func:`inherit` from it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net_cfg = (checkpoint.get("hyper_parameters") or {}).get("net")
    if not isinstance(net_cfg, dict):
        raise ValueError(f"init=supernet:{path}: not a cakes checkpoint (no hyper_parameters.net)")
    supernet = build_network(net_cfg, pretrained=False)
    load_strict(supernet, network_state(checkpoint, str(path)), f"init=supernet:{path}")
    if not any(isinstance(m, SearchSlot) for m in supernet.modules()):
        raise ValueError(f"init=supernet:{path}: the checkpoint's network has no supernet slots (not a search)")
    inherit(derived, supernet)
    log.info("inherited the kept paths of the supernet in %s", path)
