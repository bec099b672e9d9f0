"""What the video and volume data modules share: three datasets built by ``setup`` and one
``make_loader`` that turns each into a loader."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader


class SplitDataModule(pl.LightningDataModule):
    """``setup`` fills ``train_set`` / ``val_set`` / ``test_set``; subclasses implement
    :meth:`make_loader`. Asking for a loader before ``setup`` is an error naming the stage."""

    train_set: Any = None
    val_set: Any = None
    test_set: Any = None

    def make_loader(self, dataset: Any, train: bool) -> DataLoader:
        raise NotImplementedError

    def _loader(self, dataset: Any, stage: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before requesting its dataloader")
        return self.make_loader(dataset, train)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "fit", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validate", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)
