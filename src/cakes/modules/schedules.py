"""Per-iteration learning-rate factors (used through ``torch.optim.lr_scheduler.LambdaLR``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupMultiStep:
    """Linear warm-up from ``warmup_start_factor`` over ``warmup_epochs`` (per iteration), then
    ×``gamma`` at each epoch in ``milestones``. Call with the global step; returns the lr factor."""

    steps_per_epoch: int
    warmup_epochs: float = 5
    warmup_start_factor: float = 0.25
    milestones: Sequence[int] = (50, 60)
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        if step < warmup_steps:
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * step / warmup_steps
        epoch = step / self.steps_per_epoch
        return self.gamma ** sum(epoch >= m for m in self.milestones)


@dataclass(frozen=True)
class Poly:
    """``(1 - step / max_steps) ** power`` (the segmentation recipe: poly 0.9)."""

    max_steps: int
    power: float = 0.9

    def __call__(self, step: int) -> float:
        return max(0.0, 1 - step / self.max_steps) ** self.power
