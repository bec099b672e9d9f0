"""Fault tolerance: find the checkpoint to resume from, carry everything a checkpoint does not
already hold (RNG states, the position in the training data), and survive SIGTERM.

What a resumed run restores, and from where:

* weights, optimizer, lr scheduler, global step, epoch and loop progress, ModelCheckpoint state:
  Lightning (``trainer.fit(ckpt_path=...)``);
* python / numpy / torch (CPU and CUDA) RNG states and the position in the training data
  (epoch, batches done): :class:`ResumeStateCallback`;
* the training order: :class:`ResumableSampler` — a pure function of (seed, epoch) that starts
  at the saved position, so the rest of an interrupted epoch sees exactly the batches an
  uninterrupted run would (Lightning alone restarts a non-resumable loader from its first batch);
* per-sample augmentation: seeds that are a pure function of (seed, epoch, index), handed to the
  dataset with each index (``with_seeds=True``);
* supernet sampling: seeds are a pure function of (seed, rank, epoch, batch) (SupernetCallback);
* the wandb run: its id is kept in the run directory (:func:`cakes.loggers.wandb_logger`).

Checkpoint contents are plain data (tensors, numbers, strings, lists, dicts), so they load
with ``torch.load(..., weights_only=True)`` — the default of torch 2.6+.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import zipfile
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DistributedSampler

log = logging.getLogger(__name__)

#: logged (value 1) with the epoch aggregates of an epoch that a resumed run entered part-way: its
#: ``*_epoch`` training metrics cover only the batches after the resume point
PARTIAL_EPOCH_KEY = "resumed_partial_epoch"
#: file patterns that hold a resumable state: our checkpoints and Lightning's SLURM requeue saves
CHECKPOINT_GLOBS = ("checkpoints/*.ckpt", "hpc_ckpt_*.ckpt")


# --------------------------------------------------------------------------- finding the checkpoint
def is_complete_checkpoint(path: Path) -> bool:
    """A torch zip checkpoint whose central directory reads (a truncated write does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The most recently written complete checkpoint of ``run_dir`` (``checkpoints/*.ckpt`` and
    Lightning's ``hpc_ckpt_*.ckpt``), or ``None``. Incomplete files (a kill during a write) are
    skipped with a warning."""
    run_dir = Path(run_dir)
    candidates = {p for pattern in CHECKPOINT_GLOBS for p in run_dir.glob(pattern) if p.is_file()}
    # newest first; at equal times prefer last.ckpt (it is written after the named checkpoint)
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True):
        if is_complete_checkpoint(path):
            return path
        log.warning("resume: skipping incomplete checkpoint %s", path)
    return None


def resolve_resume(resume: str | None, run_dir: str | os.PathLike[str]) -> str | None:
    """``resume``: null (start fresh), ``auto`` (the newest checkpoint of this run directory,
    fresh start if there is none), or a checkpoint path (must exist)."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        found = newest_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting from scratch", run_dir)
            return None
        log.info("resume=auto: continuing from %s", found)
        return str(found)
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"resume: checkpoint not found: {path} (use resume=auto to pick the newest "
                                f"checkpoint of the run directory)")
    return str(path)


# --------------------------------------------------------------------------- pure seeds
def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (process- and platform-independent)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ResumableSampler(DistributedSampler):
    """The training order of one rank as a pure function of ``(seed, epoch)``, able to start
    part-way through an epoch.

    * Every rank draws the same permutation from ``(seed, epoch)`` and takes its stride (as
      :class:`~torch.utils.data.DistributedSampler`, which Lightning therefore leaves in place).
    * ``start=(epoch, batches)``: the first iteration yields ``epoch``'s order without its first
      ``batches × batch_size`` indices — the resume point saved by :class:`ResumeStateCallback`.
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
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
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
            indices = (torch.randperm(n, generator=generator).tolist() if self.labels is None
                       else stratified_permutation(self.labels, generator))
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


def train_sampler(dataset: Sized, trainer: pl.Trainer | None, *, batch_size: int, seed: int | None = None,
                  with_seeds: bool = False, drop_last: bool = True,
                  labels: Sequence[int] | None = None) -> ResumableSampler:
    """The training sampler of a data module: ranks from the trainer, the base seed from the
    global seed (``seed_everything``), and the resume point if this fit resumes (see
    :class:`ResumeStateCallback`)."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
    world, rank, epoch, start = 1, 0, 0, None
    if trainer is not None:
        world, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        start = take_resume_position(trainer)
    return ResumableSampler(dataset, batch_size=batch_size, num_replicas=world, rank=rank, seed=seed,
                            drop_last=drop_last, epoch=epoch, start=start, with_seeds=with_seeds, labels=labels)


def take_resume_position(trainer: pl.Trainer) -> tuple[int, int] | None:
    """The ``(epoch, batches done)`` this fit resumes at (once; ``None`` when not resuming)."""
    for callback in trainer.callbacks:
        if isinstance(callback, ResumeStateCallback):
            return callback.take_position()
    return None


# --------------------------------------------------------------------------- RNG + data position
def _rng_states() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in states:
        npy = states["numpy"]
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["gauss"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(states["cuda"])
        except (RuntimeError, IndexError):  # a different number of GPUs: keep the fresh streams
            log.warning("resume: could not restore the CUDA RNG states (device count changed?)")


class ResumeStateCallback(pl.Callback):
    """Saves in every checkpoint, as plain data: the python / numpy / torch (CPU, CUDA) RNG
    states of this rank and the next position in the training data ``(epoch, batches done)``;
    restores them when a fit resumes (the position goes to :class:`ResumableSampler` through
    :func:`train_sampler`).

    Also the SIGTERM handler's other half: Lightning turns SIGTERM (SLURM preemption or time limit,
    ``kill``) into an orderly stop after the current batch; this callback then writes ``last.ckpt``
    (``save_on_sigterm``; also on Ctrl-C and on submitit's requeue exit) and, under SLURM, requeues
    the job (``requeue_on_sigterm``: ``auto`` = when SLURM runs the job and submitit does not;
    submitit requeues its own jobs).
    """

    def __init__(self, save_on_sigterm: bool = True, requeue_on_sigterm: str | bool = "auto") -> None:
        self.save_on_sigterm = bool(save_on_sigterm)
        self.requeue_on_sigterm = requeue_on_sigterm
        self._epoch, self._batches, self._per_epoch = 0, 0, float("inf")
        self._pending: tuple[int, int] | None = None
        self._partial_epoch: int | None = None  # the epoch this fit resumed part-way through

    # -- position in the data
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch, self._batches = trainer.current_epoch, 0
        self._per_epoch = trainer.num_training_batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        self._per_epoch = trainer.num_training_batches

    def next_position(self) -> tuple[int, int]:
        """Where an uninterrupted run would read its next batch: ``(epoch, batches done)``."""
        if self._batches >= self._per_epoch:
            return self._epoch + 1, 0
        return self._epoch, self._batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and trainer.fit_loop.restarting:
            # the order continues where it stopped: Lightning's "dataloader is not resumable" does not apply
            import warnings

            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            log.info("resume: epoch %d continues at batch %d in the original order", self._epoch, self._batches)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the epoch aggregates (train/*_epoch) of an epoch entered part-way cover only the batches
        # after the resume point: mark that row of the log (README, "Reliability and security")
        if self._partial_epoch is not None and self._partial_epoch == trainer.current_epoch:
            pl_module.log(PARTIAL_EPOCH_KEY, 1.0, on_step=False, on_epoch=True, logger=True)
        self._partial_epoch = None

    def take_position(self) -> tuple[int, int] | None:
        pending, self._pending = self._pending, None
        return pending

    # -- checkpoint state (Lightning calls these with the trainer's save / restore)
    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self.next_position()
        return {"rng": _rng_states(), "position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("position")
        if position is not None:
            self._epoch, self._batches = int(position["epoch"]), int(position["batches"])
            self._pending = (self._epoch, self._batches)
            self._partial_epoch = self._epoch if self._batches else None
        if state_dict.get("rng"):
            _set_rng_states(state_dict["rng"])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # a resume point is for the fit that loaded it only

    # -- SIGTERM / preemption
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.trainer.states import TrainerFn
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, (SystemExit, KeyboardInterrupt)) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking or not self.save_on_sigterm:
            pass
        elif isinstance(exception, SIGTERMException):  # every rank stops at the same step (Lightning broadcasts)
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                log.warning("SIGTERM: saved %s (global step %d); continue with resume=auto in the same run "
                            "directory (see resume_command.txt)", path, trainer.global_step)
        elif trainer.is_global_zero:  # Ctrl-C, or submitit's requeue exit (rank zero only): no collectives
            path = last_checkpoint_path(trainer)
            trainer.strategy.checkpoint_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), path)
            log.warning("%s: saved %s (global step %d); continue with resume=auto in the same run directory",
                        type(exception).__name__, path, trainer.global_step)
        if isinstance(exception, SIGTERMException) and self._should_requeue() and trainer.is_global_zero:
            requeue_slurm_job()

    def _should_requeue(self) -> bool:
        if self.requeue_on_sigterm == "auto":
            return "SLURM_JOB_ID" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ
        return bool(self.requeue_on_sigterm)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """``<checkpoint dir>/last.ckpt`` of the trainer's (first) ModelCheckpoint, else of the run dir."""
    callback = trainer.checkpoint_callback
    folder = Path(callback.dirpath) if callback is not None and callback.dirpath else (
        Path(trainer.default_root_dir) / "checkpoints")
    return folder / "last.ckpt"


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task aware); ``True`` on success."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("SIGTERM: could not requeue SLURM job %s: %s", job, err)
        return False
    if result.returncode != 0:
        log.warning("SIGTERM: scontrol requeue %s failed: %s", job, result.stderr.strip())
        return False
    log.warning("SIGTERM: requeued SLURM job %s", job)
    return True
