"""The training order: a pure function of ``(seed, epoch)`` that can start part-way through an
epoch, so the rest of an interrupted epoch sees exactly the batches an uninterrupted run would
(Lightning alone restarts a non-resumable loader from its first batch)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence, Sized
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch.utils.data import DistributedSampler

from cakes.utils import mix_seed


@runtime_checkable
class ResumePositionSource(Protocol):
    """A callback that knows where a resumed fit continues
    (:class:`cakes.callbacks.resume.ResumeStateCallback`)."""

    def take_position(self) -> tuple[int, int] | None:
        """The ``(epoch, batches done)`` this fit resumes at, once; ``None`` when not resuming."""


class ResumableSampler(DistributedSampler):
    """The training order of one rank as a pure function of ``(seed, epoch)``, able to start
    part-way through an epoch.

    * Every rank draws the same permutation from ``(seed, epoch)`` and takes its stride (as
      :class:`~torch.utils.data.DistributedSampler`, which Lightning therefore leaves in place).
    * ``start=(epoch, batches)``: the first iteration yields ``epoch``'s order without its first
      ``batches × batch_size`` indices — the resume point saved by
      :class:`~cakes.callbacks.resume.ResumeStateCallback`.
      Later iterations follow :meth:`set_epoch` (Lightning calls it every epoch).
    * ``with_seeds=True`` yields ``(index, seed)`` pairs with ``seed = mix_seed(seed, epoch,
      index)``, for datasets that seed each sample's augmentation from it.
    * ``labels`` (one class per item) makes the shuffle stratified (:func:`stratified_permutation`):
      batches then hold every class equally often — for few-class data, where the label imbalance
      of a small batch dominates the gradient of the classifier.
    """

    def __init__(
        self,
        dataset: Sized,
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epoch: int = 0,
        start: tuple[int, int] | None = None,
        with_seeds: bool = False,
        labels: Sequence[int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if labels is not None and len(labels) != len(dataset):
            raise ValueError(f"labels: one per item expected, got {len(labels)} for {len(dataset)} items")
        self.labels = None if labels is None else [int(c) for c in labels]
        self.batch_size, self.with_seeds = int(batch_size), bool(with_seeds)
        self.epoch = int(epoch)
        self.start = (int(start[0]), int(start[1])) if start is not None else None

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (before any skipping)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            indices = (
                torch.randperm(n, generator=generator).tolist()
                if self.labels is None
                else stratified_permutation(self.labels, generator)
            )
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            pad = self.total_size - len(indices)
            indices += (indices * (pad // max(1, len(indices)) + 1))[:pad]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self.epoch, 0
        if self.start is not None:  # one-shot: the resume point
            (epoch, skip), self.start = self.start, None
            self.epoch = epoch
        indices = self.order(epoch)[skip * self.batch_size :]
        if self.with_seeds:
            return iter([(i, mix_seed(self.seed, epoch, i)) for i in indices])
        return iter(indices)


def stratified_permutation(labels: Sequence[int], generator: torch.Generator) -> list[int]:
    """A random order of ``range(len(labels))`` in rounds: each round takes the next item of every
    class that has one left, classes in a random order; items of a class in a random order. With
    ``K`` equally large classes every run of ``K`` items aligned to a round holds each class once."""
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(labels), generator=generator).tolist():
        by_class.setdefault(labels[i], []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    order: list[int] = []
    for position in range(max(map(len, queues), default=0)):
        for k in torch.randperm(len(queues), generator=generator).tolist():
            if position < len(queues[k]):
                order.append(queues[k][position])
    return order


def train_sampler(
    dataset: Sized,
    trainer: pl.Trainer | None,
    *,
    batch_size: int,
    seed: int | None = None,
    with_seeds: bool = False,
    drop_last: bool = True,
    labels: Sequence[int] | None = None,
) -> ResumableSampler:
    """The training sampler of a data module: ranks from the trainer, the base seed from the
    global seed (``seed_everything``), and the resume point if this fit resumes (see
    :class:`~cakes.callbacks.resume.ResumeStateCallback`)."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
    world, rank, epoch, start = 1, 0, 0, None
    if trainer is not None:
        world, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        start = take_resume_position(trainer)
    return ResumableSampler(
        dataset,
        batch_size=batch_size,
        num_replicas=world,
        rank=rank,
        seed=seed,
        drop_last=drop_last,
        epoch=epoch,
        start=start,
        with_seeds=with_seeds,
        labels=labels,
    )


def take_resume_position(trainer: pl.Trainer) -> tuple[int, int] | None:
    """The ``(epoch, batches done)`` this fit resumes at (once; ``None`` when not resuming)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ResumePositionSource):
            return callback.take_position()
    return None
