"""Fault tolerance: find the checkpoint to resume from, carry everything a checkpoint does not
already hold (RNG states, the position in the training data), and survive SIGTERM.

What a resumed run restores, and from where:

* weights, optimizer, lr scheduler, global step, epoch and loop progress, ModelCheckpoint state:
  Lightning (``trainer.fit(ckpt_path=...)``);
* python / numpy / torch (CPU and CUDA) RNG states (:mod:`cakes.rng`) and the position in the
  training data (epoch, batches done): :class:`ResumeStateCallback`;
* the training order: :class:`cakes.sampler.ResumableSampler` — a pure function of (seed, epoch) that starts
  at the saved position, so the rest of an interrupted epoch sees exactly the batches an
  uninterrupted run would (Lightning alone restarts a non-resumable loader from its first batch);
* per-sample augmentation: seeds that are a pure function of (seed, epoch, index), handed to the
  dataset with each index (``with_seeds=True``);
* supernet sampling: seeds are a pure function of (seed, rank, epoch, batch) (SupernetCallback);
* the wandb run: its id is kept in the run directory (:func:`cakes.loggers.wandb_logger`);
* the checkpoint itself: found by :func:`cakes.checkpoints.resolve_resume`; on SIGTERM this callback
  writes ``last.ckpt`` and, under SLURM, requeues the job (:func:`requeue_slurm_job`).

Checkpoint contents are plain data (tensors, numbers, strings, lists, dicts), so they load
with ``torch.load(..., weights_only=True)`` — the default of torch 2.6+.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from cakes.rng import capture_rng_states, restore_rng_states
from cakes.sampler import ResumableSampler

log = logging.getLogger(__name__)

#: logged (value 1) with the epoch aggregates of an epoch that a resumed run entered part-way: its
#: ``*_epoch`` training metrics cover only the batches after the resume point
PARTIAL_EPOCH_KEY = "resumed_partial_epoch"


class ResumeStateCallback(pl.Callback):
    """Saves in every checkpoint, as plain data: the python / numpy / torch (CPU, CUDA) RNG
    states of this rank and the next position in the training data ``(epoch, batches done)``;
    restores them when a fit resumes (the position goes to :class:`~cakes.sampler.ResumableSampler`
    through :func:`cakes.sampler.train_sampler`).

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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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
        # after the resume point: mark that row of the log (docs/operations.md#metrics-of-a-resumed-epoch)
        if self._partial_epoch is not None and self._partial_epoch == trainer.current_epoch:
            pl_module.log(PARTIAL_EPOCH_KEY, 1.0, on_step=False, on_epoch=True, logger=True)
        self._partial_epoch = None

    def take_position(self) -> tuple[int, int] | None:
        pending, self._pending = self._pending, None
        return pending

    # -- checkpoint state (Lightning calls these with the trainer's save / restore)
    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self.next_position()
        return {"rng": capture_rng_states(), "position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("position")
        if position is not None:
            self._epoch, self._batches = int(position["epoch"]), int(position["batches"])
            self._pending = (self._epoch, self._batches)
            self._partial_epoch = self._epoch if self._batches else None
        if state_dict.get("rng"):
            restore_rng_states(state_dict["rng"])

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
                log.warning(
                    "SIGTERM: saved %s (global step %d); continue with resume=auto in the same run "
                    "directory (see resume_command.txt)",
                    path,
                    trainer.global_step,
                )
        elif trainer.is_global_zero:  # Ctrl-C, or submitit's requeue exit (rank zero only): no collectives
            path = last_checkpoint_path(trainer)
            trainer.strategy.checkpoint_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), path)
            log.warning(
                "%s: saved %s (global step %d); continue with resume=auto in the same run directory",
                type(exception).__name__,
                path,
                trainer.global_step,
            )
        if isinstance(exception, SIGTERMException) and self._should_requeue() and trainer.is_global_zero:
            requeue_slurm_job()

    def _should_requeue(self) -> bool:
        if self.requeue_on_sigterm == "auto":
            return "SLURM_JOB_ID" in os.environ and "SUBMITIT_EXECUTOR" not in os.environ
        return bool(self.requeue_on_sigterm)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """``<checkpoint dir>/last.ckpt`` of the trainer's (first) ModelCheckpoint, else of the run dir."""
    callback = trainer.checkpoint_callback
    folder = (
        Path(callback.dirpath)
        if callback is not None and callback.dirpath
        else (Path(trainer.default_root_dir) / "checkpoints")
    )
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
