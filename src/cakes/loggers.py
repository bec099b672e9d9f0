"""Loggers that behave on clusters and across resumes: wandb never prompts, blocks or fails for lack
of a key/network and continues its run after a resume; the CSV log is continued, not replaced; the
resolved config goes to every logger (and to wandb as a file and an artifact)."""

from __future__ import annotations

import csv
import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

OFFLINE_MODES = ("offline", "dryrun", "disabled")


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume in the same run directory: the resumed
    run appends (rows for steps between the checkpoint and the interruption appear twice, the
    later ones from the resumed run)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_api_key_configured() -> bool:
    """An API key in the environment or in ``~/.netrc`` (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sync_hint(save_dir: str | os.PathLike[str]) -> str:
    return f"wandb sync {Path(save_dir) / 'wandb'}/offline-run-*"


def wandb_run_id(save_dir: str | os.PathLike[str]) -> str | None:
    """The wandb run id of a run directory: read from ``<save_dir>/wandb_run_id``; created there by
    global rank zero on first use (other ranks never log, and must not race to write it)."""
    id_file = Path(save_dir) / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip() or None
    if rank_zero_only.rank != 0:
        return None
    from cakes.files import write_atomic

    run_id = uuid.uuid4().hex[:12]
    write_atomic(id_file, run_id + "\n")
    return run_id


def wandb_logger(save_dir: str, project: str = "cakes", offline: bool | None = None, **kwargs: Any):
    """A ``WandbLogger`` keyed to the run directory.

    * Offline when asked, when ``WANDB_MODE`` is offline/disabled, or when no API key is configured
      (then it says how to sync) — it never prompts or waits for a network.
    * The run id is kept in ``<save_dir>/wandb_run_id``: a resumed run (same directory) continues
      the same wandb run.
    """
    from pytorch_lightning.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE", "")
    if offline is None:
        offline = mode in OFFLINE_MODES or not wandb_api_key_configured()
        if offline and mode not in OFFLINE_MODES and rank_zero_only.rank == 0:
            log.warning(
                "wandb: no API key configured (WANDB_API_KEY or `wandb login`); logging offline under "
                "%s/wandb — upload later with `%s`",
                save_dir,
                sync_hint(save_dir),
            )
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return WandbLogger(
        save_dir=save_dir, project=project, offline=offline, id=wandb_run_id(save_dir), resume="allow", **kwargs
    )


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


class LogConfigCallback(pl.Callback):
    """At the start of every fit, on global rank zero (so also inside ``ddp_spawn`` workers): the
    resolved config as hyper-parameters of every logger, and for wandb the config file itself
    (run files + a ``config`` artifact).

    Args:
        config: the resolved config as plain data.
        config_file: the ``config_resolved.yaml`` written to the run directory.
    """

    def __init__(self, config: dict[str, Any], config_file: str | None = None) -> None:
        self.config, self.config_file = config, config_file

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
            if is_wandb(logger) and self.config_file and Path(self.config_file).is_file():
                self._wandb_config_file(logger)

    def _wandb_config_file(self, logger: Any) -> None:
        import wandb

        run = logger.experiment
        path = Path(self.config_file)
        try:
            run.save(str(path), base_path=str(path.parent), policy="now")
            artifact = wandb.Artifact(
                f"config-{run.id}", type="config", metadata={"task_name": self.config.get("task_name")}
            )
            artifact.add_file(str(path))
            run.log_artifact(artifact)
        except Exception as err:  # noqa: BLE001 - logging must never stop a run
            log.warning("wandb: could not attach %s: %s", path, err)


def finish_loggers(loggers: list[Any]) -> None:
    """Close the wandb run of this process (so sweeps never hang on an open run) and, for an
    offline run, say how to upload it."""
    for logger in loggers:
        if not is_wandb(logger):
            continue
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("wandb: finish failed: %s", err)
        if getattr(logger, "_offline", False) and rank_zero_only.rank == 0:
            save_dir = logger.save_dir or "."
            print(
                f"wandb: offline run in {Path(save_dir) / 'wandb'}; upload it with `{sync_hint(save_dir)}`", flush=True
            )
