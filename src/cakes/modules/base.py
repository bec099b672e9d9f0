"""What the video and the volumetric LightningModules share: the network built from its
config (:func:`cakes.builders.build_network`), the optimiser with decay-free norms and biases,
linear lr scaling by the global batch, self-describing checkpoints, and the model's params/MACs
logged at the start of a run."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from cakes.builders import build_network
from cakes.utils import plain
from cakes.ops.search import calibrate_macs_costs

log = logging.getLogger(__name__)


def _channels_last_input(_module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: 5-D inputs in NDHWC memory (same values, different strides)."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last_3d) if torch.is_tensor(a) and a.dim() == 5 else a for a in args
    )


def first_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each distinct value in ``index`` (de-duplicating
    evaluation samples that a distributed sampler padded onto several ranks)."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[first]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and decay-free norm parameters and biases (every 0/1-D tensor)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class CakesModule(pl.LightningModule):
    """Base LightningModule.

    Args:
        net: the network config (``_target_`` tree), stored in the checkpoint so that
            ``load_from_checkpoint(path)`` rebuilds the architecture with no other config.
        optimizer: ``{name: sgd, lr, momentum, weight_decay, nesterov}``; ``lr`` is the rate at
            ``base_batch_size`` and is scaled linearly to the run's global batch.
        scheduler: subclass-specific schedule settings.
        base_batch_size: the global batch at which ``optimizer.lr`` is given.
        input_shape: one view's input shape without the batch axis (for params/MACs logging).
        channels_last: keep weights and activations in NDHWC memory format; 3D convolutions are
            several times faster so on CPU (oneDNN) and with cuDNN under AMP. Values are unchanged.
    """

    #: where the input size of the network is configured (named in errors)
    input_source = "model.input_shape"

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        base_batch_size: int,
        input_shape: list[int] | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "net": plain(net),
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler),
                "base_batch_size": base_batch_size,
                "input_shape": plain(input_shape),
                "channels_last": channels_last,
            }
        )
        self.net = build_network(self.hparams.net)
        if input_shape and hasattr(self.net, "check_input_size"):  # before anything runs the network
            self.net.check_input_size(list(input_shape)[1:], source=self.input_source)
        if channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
            self.net.register_forward_pre_hook(_channels_last_input)
        if input_shape:
            calibrate_macs_costs(self.net, list(input_shape))

    # --- batch size and learning rate -----------------------------------------------------------
    def global_batch_size(self) -> int:
        """Per-device batch × devices × nodes × gradient accumulation."""
        datamodule = self.trainer.datamodule
        per_device = int(datamodule.batch_size)
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def scaled_lr(self) -> float:
        opt = self.hparams.optimizer
        return float(opt["lr"]) * self.global_batch_size() / float(self.hparams.base_batch_size)

    def make_optimizer(self) -> torch.optim.Optimizer:
        opt = dict(self.hparams.optimizer)
        name = opt.pop("name", "sgd")
        if name != "sgd":
            raise ValueError(f"optimizer.name: only 'sgd' (the papers' recipe) is supported, got {name!r}")
        lr = self.scaled_lr()
        log.info(
            "lr %.5g = %.5g x global batch %d / %d",
            lr,
            opt["lr"],
            self.global_batch_size(),
            self.hparams.base_batch_size,
        )
        return torch.optim.SGD(
            parameter_groups(self.net, float(opt["weight_decay"])),
            lr=lr,
            momentum=float(opt.get("momentum", 0.9)),
            nesterov=bool(opt.get("nesterov", False)),
        )

    # --- evaluation: subclasses score a whole split at once in _eval_epoch_end(stage) --------------
    def _eval_epoch_end(self, stage: str) -> None:
        raise NotImplementedError

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --- checkpoints describe themselves -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the weights are in the checkpoint: never re-read ImageNet files when it is reloaded
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("net"), dict) and "pretrained" in hparams["net"]:
            hparams["net"] = {**hparams["net"], "pretrained": None}
        checkpoint["cakes"] = {
            "backbone": getattr(self.net, "name", type(self.net).__name__),
            "input_shape": self.hparams.input_shape,
        }

    def on_fit_start(self) -> None:
        if self.hparams.input_shape and self.trainer.is_global_zero:
            from cakes.profile import profile

            # the network as it runs now (a performance-priority supernet: its current selection)
            result = profile(self.net, (1, *self.hparams.input_shape))
            log.info(
                "model: %s params, %.3f GMACs per view at %s",
                f"{result.params:,}",
                result.macs / 1e9,
                tuple(self.hparams.input_shape),
            )
            for logger in self.loggers:
                logger.log_hyperparams({"model/params": result.params, "model/gmacs": result.macs / 1e9})
