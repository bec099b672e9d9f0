"""The per-epoch account of training samples dropped by ``data.bad_sample=skip``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class BadSampleReport(pl.Callback):
    """Counts the samples ``data.bad_sample=skip`` dropped (``batch["skipped"]``) in every training epoch,
    sums them over ranks, logs the sum as ``train/skipped_samples`` (for loaders whose batches carry the
    count) and prints it when it is not zero. Each dropped sample is named in a ``BadSampleWarning``
    where it was read. The only counter of skipped samples."""

    def __init__(self) -> None:
        self._skipped_this_epoch = 0
        self._batches_count_skips = False
        self.history: list[tuple[int, int]] = []  # (epoch, skipped over all ranks)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._skipped_this_epoch = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict) and "skipped" in batch:
            self._batches_count_skips = True
            self._skipped_this_epoch += int(batch["skipped"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.strategy.reduce(
            torch.tensor(float(self._skipped_this_epoch), device=pl_module.device), reduce_op="sum"
        )
        skipped = int(round(float(total)))
        self.history.append((trainer.current_epoch, skipped))
        if self._batches_count_skips:
            pl_module.log("train/skipped_samples", float(skipped), rank_zero_only=True)
        if skipped and trainer.is_global_zero:
            message = (
                f"epoch {trainer.current_epoch}: skipped {skipped} unreadable training sample(s) "
                "(data.bad_sample=skip; each is named in a BadSampleWarning; "
                "python -m cakes.check_data <overrides> lists them all)"
            )
            log.warning(message)
            print(message, file=sys.stderr, flush=True)
