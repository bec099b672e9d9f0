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
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from cakes.checkpoints import load_strict, network_state
from cakes.inherit import inherit_from_checkpoint

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
            log.warning(
                "backbone.pretrained=none: training from scratch, but this recipe's paper numbers were "
                "obtained from ImageNet initialisation (torchvision's original ResNet-50 weights)"
            )
            return {"init": None, "imagenet": "none (explicitly disabled; the paper used ImageNet weights)"}
        return {"init": None, "imagenet": None}
    if pretrained is None and cfg.get("imagenet_required"):
        raise ValueError(
            "this recipe needs ImageNet initialisation as in the paper: set backbone.pretrained=/path/resnet50.pth "
            "(torchvision's original ResNet-50 weights, a local file), or backbone.pretrained=none to train from "
            "scratch on purpose, or init=<checkpoint> to start from a checkpoint"
        )
    return {"init": None, "imagenet": None if pretrained is None else str(pretrained)}


def apply_init(net: nn.Module, init: str) -> None:
    """Initialise ``net`` as ``init`` says (see the module docstring)."""
    kind, path = parse_init(init)
    if kind == "supernet":
        inherit_from_checkpoint(net, path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        load_strict(net, network_state(checkpoint, str(path)), f"init={init}")
    log.info("initial weights from %s", init)
