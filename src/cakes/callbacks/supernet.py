"""Training-time behaviour of a supernet: the cost-weighted lasso and per-rank sampling seeds."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from cakes.ops.search import CostPrioritySlot, PerformancePrioritySlot, search_slots
from cakes.utils import mix_seed


def apply_lasso(net: nn.Module, strength: float) -> int:
    """Add ``strength · w_k · sign(γ)`` to the γ gradients of every cost-priority slot norm (and
    nowhere else). Returns how many slots were penalised."""
    slots = [m for m in search_slots(net) if isinstance(m, CostPrioritySlot)]
    for slot in slots:
        gamma = slot.norm.weight
        if gamma.grad is not None:
            gamma.grad.add_(strength * slot.cost_weights.to(gamma.grad.dtype) * torch.sign(gamma.detach()))
    return len(slots)


class SupernetCallback(pl.Callback):
    """Drives the supernet during a search.

    Args:
        lasso: strength ``s`` of the cost-weighted L1 on the cost-priority path weights; applied in
            ``on_before_optimizer_step`` — after AMP unscaling, before gradient clipping.
        seed: base seed of the performance-priority sampling; each DDP rank and each batch gets
            its own stream (:func:`cakes.utils.mix_seed` of seed, rank, epoch and batch).
        full_kernel_epochs: warm-up: in the first epochs only the full kernel works — a
            performance-priority slot runs its shared full kernel on every channel (sampling starts
            after), a cost-priority slot zeroes its other paths (and the lasso waits) — so the
            supernet trains as a plain 3D network first. Needs the full kernel in the op set and,
            for performance-priority, ``shared_kernel`` (checked at fit start).
    """

    def __init__(self, lasso: float = 0.0, seed: int = 0, full_kernel_epochs: int = 0) -> None:
        if lasso < 0:
            raise ValueError(f"search.lasso must be >= 0, got {lasso}")
        if full_kernel_epochs < 0:
            raise ValueError(f"search.full_kernel_epochs must be >= 0, got {full_kernel_epochs}")
        self.lasso, self.seed, self.full_kernel_epochs = float(lasso), int(seed), int(full_kernel_epochs)
        self._samplers: list[Any] = []
        self._cost_slots: list[CostPrioritySlot] = []
        self.warming_up = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        slots = search_slots(pl_module)
        if not slots:
            raise ValueError("SupernetCallback: the model has no search-time slots (operator must be a supernet)")
        cost = [s for s in slots if isinstance(s, CostPrioritySlot)]
        if self.lasso > 0 and not cost:
            raise ValueError(
                f"search.lasso={self.lasso} but the model has no cost-priority slots: the lasso would do nothing"
            )
        performance = [s for s in slots if isinstance(s, PerformancePrioritySlot)]
        if self.full_kernel_epochs:
            unfit = [s for s in slots if s.full_op is None]
            if unfit:
                slot = unfit[0]
                performance_slot = isinstance(slot, PerformancePrioritySlot)
                shared = f", shared_kernel={slot.shared_kernel}" if performance_slot else ""
                raise ValueError(
                    f"search.full_kernel_epochs={self.full_kernel_epochs} needs the full kernel "
                    f"(3x3x3) in the op set, and search.shared_kernel=true for performance-priority "
                    f"slots: layer {slot.layer!r} (op set {slot.op_set.name}{shared}); or turn the "
                    f"warm-up off with search.full_kernel_epochs=0"
                )
        self._samplers = list({id(s.sampler): s.sampler for s in performance}.values())
        self._cost_slots = cost
        self._set_full_kernel(trainer.current_epoch)  # also right for a resumed fit's first validation

    def _set_full_kernel(self, epoch: int) -> None:
        self.warming_up = epoch < self.full_kernel_epochs
        for holder in (*self._samplers, *self._cost_slots):
            holder.full_kernel = self.warming_up

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for sampler in self._samplers:
            sampler.seed(mix_seed(self.seed, trainer.global_rank, trainer.current_epoch, batch_idx))
        self._set_full_kernel(trainer.current_epoch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.lasso > 0 and not self.warming_up:  # paths that carry nothing yet are not penalised
            apply_lasso(pl_module, self.lasso)
