"""Video clip classification (Something-Something): cross-entropy, top-1/top-5, multi-view test."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from cakes.modules.base import CakesModule, first_occurrence
from cakes.modules.schedules import WarmupMultiStep


class VideoClassificationModule(CakesModule):
    """Clips ``(B, 3, T, H, W)`` → logits ``(B, num_classes)``; test batches may carry several
    views ``(B, V, 3, T, H, W)`` whose softmax scores are averaged per video.

    Validation and test gather (video index, scores) from every rank and count each video once,
    so the padding a distributed sampler adds never double-counts a video.

    Scheduler settings: ``warmup_epochs``, ``warmup_start_factor`` (lr fraction at step 0),
    ``milestones`` (epochs), ``gamma``.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        base_batch_size: int = 96,
        input_shape: list[int] | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__(net, optimizer, scheduler, base_batch_size, input_shape, channels_last)
        self.num_classes = int(self.net.num_classes)
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, classes)`` logits, or ``(B, V, 3, T, H, W) -> (B, classes)``
        softmax scores averaged over the V views."""
        if video.dim() == 6:
            b, v = video.shape[:2]
            scores = self.net(video.flatten(0, 1)).softmax(dim=-1)
            return scores.view(b, v, -1).mean(dim=1)
        return self.net(video)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if len(batch["label"]) == 0:  # every sample was skipped (bad_sample=skip; counted by BadSampleReport)
            return None
        logits = self.net(batch["video"])
        loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(dim=-1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(logits))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(logits))
        return loss

    # --- evaluation: gather, de-duplicate by video index, score once ---------------------------------
    def _eval_step(self, batch: dict[str, Any]) -> None:
        scores = self(batch["video"])
        if batch["video"].dim() == 5:
            scores = scores.softmax(dim=-1)
        self._eval_outputs.append((batch["index"], scores.detach(), batch["label"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._eval_outputs:
            return
        index = torch.cat([o[0] for o in self._eval_outputs])
        scores = torch.cat([o[1] for o in self._eval_outputs])
        labels = torch.cat([o[2] for o in self._eval_outputs])
        self._eval_outputs.clear()
        if self.trainer.world_size > 1:
            index, scores, labels = (self.all_gather(t).flatten(0, 1) for t in (index, scores, labels))
        keep = first_occurrence(index)
        scores, labels = scores[keep], labels[keep]
        loss = F.nll_loss(scores.clamp_min(1e-12).log(), labels)
        metrics = {f"{stage}/loss": loss, f"{stage}/videos": torch.tensor(float(len(labels)))}
        for k in (1, 5):
            if k <= self.num_classes:
                acc = MulticlassAccuracy(self.num_classes, top_k=k, average="micro").to(scores.device)
                metrics[f"{stage}/top{k}"] = acc(scores, labels)
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=False, rank_zero_only=True)

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        sched = dict(self.hparams.scheduler)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        factor = WarmupMultiStep(
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=float(sched.get("warmup_epochs", 5)),
            warmup_start_factor=float(sched.get("warmup_start_factor", 0.25)),
            milestones=tuple(sched.get("milestones", (50, 60))),
            gamma=float(sched.get("gamma", 0.1)),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
