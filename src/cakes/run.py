"""The one straight function behind ``train.py`` and ``search.py``:
seed → record the run → data (validated before any model is built) → model → callbacks,
loggers, trainer → fit → test the best checkpoint."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def git_commit(cwd: Path | None = None) -> str:
    """``<sha>`` or ``<sha>-dirty`` of the code being run, ``unknown`` outside a checkout."""
    where = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@rank_zero_only
def record_run(cfg: DictConfig, output_dir: Path) -> None:
    """Resolved config, git commit and environment into the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    info = {
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "host": platform.node(),
        "seed": cfg.get("seed"),
    }
    write_atomic(output_dir / "run_info.json", json.dumps(info, indent=2) + "\n")


def instantiate_dict(nodes: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a ``{name: node}`` group (callbacks, loggers); null
    entries are skipped so a recipe can switch one off with ``callbacks.lr_monitor=null``."""
    if not nodes:
        return []
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """``resume``: null, a checkpoint path, or ``auto`` (``last.ckpt`` of this run dir if any)."""
    resume = cfg.get("resume")
    if resume in (None, ""):
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume: checkpoint not found: {resume}")
    return str(resume)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as the config says; returns the final logged metrics."""
    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    record_run(cfg, output_dir)

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    if hasattr(datamodule, "validate"):
        datamodule.validate()  # bad roots, lists, labels: fail here, before any model is built

    model: pl.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_resume(cfg, output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if trainer.is_global_zero:
        write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        for callback in callbacks:
            command = getattr(callback, "retrain_command", None)
            if command:  # a search: say exactly how to retrain what it found
                write_atomic(output_dir / "retrain_command.txt", command + "\n")
                print(f"\nFound architecture: {callback.export_path}\nRetrain it with:\n  {command}\n", flush=True)
    return metrics
