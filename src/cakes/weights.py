"""Where a run's initial weights come from, settled before anything is built.

* ImageNet: ``backbone.pretrained=<torchvision-format ResNet-50 file>``. Recipes that set
  ``imagenet_required: true`` (the SSV1 ones: the paper's numbers need it) refuse to start without it,
  unless ``backbone.pretrained=none`` says "from scratch" on purpose (a warning, and
  ``run_info.json`` records it).
* ``init=<checkpoint>``: every weight of the network from a checkpoint of the same architecture
  (e.g. one converted from the authors' release by ``python -m cakes.convert``), loaded strictly;
  with ``train=false`` the run only tests it.
* ``init=supernet:<search checkpoint>``: the derived network inherits the kept paths of the
  supernet (:mod:`cakes.inherit`).

With ``init`` set, ImageNet files are not read: the checkpoint supplies every weight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

log = logging.getLogger(__name__)

SUPERNET_PREFIX = "supernet:"


def parse_init(init: str) -> tuple[str, Path]:
    """``"supernet:<path>"`` → ``("supernet", path)``; ``"<path>"`` → ``("checkpoint", path)``.

    Raises ``FileNotFoundError`` naming ``init`` when the file does not exist."""
    text = str(init)
    kind = "supernet" if text.startswith(SUPERNET_PREFIX) else "checkpoint"
    path = Path(text.removeprefix(SUPERNET_PREFIX)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init={text}: checkpoint file not found: {path}")
    return kind, path


def check_initial_weights(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``init`` / ``backbone.pretrained`` against the recipe and normalise ``cfg`` in place
    (``none`` → null; ImageNet dropped when ``init`` supplies the weights). Returns what
    ``run_info.json`` records under ``initial_weights``."""
    init = cfg.get("init")
    backbone = cfg.get("backbone") or {}
    pretrained = backbone.get("pretrained")
    if init:
        parse_init(init)
        if pretrained not in (None, "none"):
            log.info("backbone.pretrained=%s is not read: init=%s supplies every weight", pretrained, init)
        if "pretrained" in backbone:
            cfg.backbone.pretrained = None
        return {"init": str(init), "imagenet": None}
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        cfg.backbone.pretrained = None
        if cfg.get("imagenet_required"):
            log.warning("backbone.pretrained=none: training from scratch, but this recipe's paper numbers were "
                        "obtained from ImageNet initialisation (torchvision's original ResNet-50 weights)")
            return {"init": None, "imagenet": "none (explicitly disabled; the paper used ImageNet weights)"}
        return {"init": None, "imagenet": None}
    if pretrained is None and cfg.get("imagenet_required"):
        raise ValueError(
            "this recipe needs ImageNet initialisation as in the paper: set backbone.pretrained=/path/resnet50.pth "
            "(torchvision's original ResNet-50 weights, a local file), or backbone.pretrained=none to train from "
            "scratch on purpose, or init=<checkpoint> to start from a checkpoint"
        )
    return {"init": None, "imagenet": None if pretrained is None else str(pretrained)}


def key_problems(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected``."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs network {tuple(v.shape)}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    return ([f"missing keys: {missing}"] if missing else []) + (
        [f"unexpected keys: {unexpected}"] if unexpected else []) + shapes


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


def apply_init(net: nn.Module, init: str) -> None:
    """Initialise ``net`` as ``init`` says (see the module docstring)."""
    kind, path = parse_init(init)
    if kind == "supernet":
        from cakes.inherit import inherit_from_checkpoint

        inherit_from_checkpoint(net, path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        load_strict(net, network_state(checkpoint, str(path)), f"init={init}")
    log.info("initial weights from %s", init)
