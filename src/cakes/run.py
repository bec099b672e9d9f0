"""The one straight function behind ``train.py`` and ``search.py``:
check the arch (data, never code) → seed → callbacks, loggers, trainer → batch sizes (checked) →
record the run → data (validated before any model is built) → model (initial weights:
:mod:`cakes.weights`) → fit (resuming if asked; skipped with ``train=false``) → test the best
checkpoint → close the loggers.

One run directory per run, whatever the launcher: Lightning's DDP launchers reuse it, and under
``torchrun`` / ``srun`` an explicit ``hydra.run.dir`` is required (:mod:`cakes.distributed`).
Everything written to it comes from global rank zero."""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cakes.arch import check_arch
from cakes.builders import build_model
from cakes.callbacks.resume import PARTIAL_EPOCH_KEY
from cakes.checkpoints import resolve_resume as _resolve_resume
from cakes.distributed import check_shared_run_dir, ddp_strategy, resolve_batch_size, trainer_parallelism
from cakes.files import write_atomic
from cakes.loggers import LogConfigCallback, finish_loggers
from cakes.ops import plan as conv_plan
from cakes.utils import git_commit
from cakes.weights import apply_init, check_initial_weights

log = logging.getLogger(__name__)

#: exit status of ``train.py`` / ``search.py`` stopped by SIGTERM (preemption, a time limit, ``kill``)
#: after it saved ``last.ckpt``: 128 + 15, as a shell reports a process that SIGTERM ended. Continue
#: it with ``resume=auto`` in the same run directory. (0: finished; 1: failed.)
EXIT_PREEMPTED = 143


@rank_zero_only
def record_run(cfg: DictConfig, output_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """Resolved config, git commit and environment into the run directory (a resumed run keeps
    the first record and adds ``run_info.resume<N>.json``), and ``resume_command.txt``."""
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
        **(extra or {}),
    }
    name = "run_info.json"
    if (output_dir / name).is_file() and info.get("resumed_from"):
        k = 1
        while (output_dir / f"run_info.resume{k}.json").is_file():
            k += 1
        name = f"run_info.resume{k}.json"
    write_atomic(output_dir / name, json.dumps(info, indent=2) + "\n")
    command = resume_command(output_dir)
    if command:
        write_atomic(output_dir / "resume_command.txt", command + "\n")
        log.info("if interrupted, continue with: %s", command)


class RunDirError(RuntimeError):
    """The run directory already holds another run's records, and the run was not asked to resume."""


#: what a run directory holds once a run has started in it (never overwritten by another run)
RUN_RECORDS = ("config_resolved.yaml", "run_info.json", "metrics.json")


def check_fresh_run_dir(cfg: DictConfig, output_dir: Path) -> None:
    """Refuse to start a fresh run (``resume`` null) in a directory where a run already wrote its
    records or checkpoints: its ``config_resolved.yaml``, ``run_info.json`` and ``last.ckpt`` would
    be overwritten. Checked by global rank zero only (Lightning's DDP launcher re-runs the script in
    the same directory for the other ranks, after rank zero has written its records)."""
    if cfg.get("resume") not in (None, "", "null") or rank_zero_only.rank != 0:
        return
    found = [name for name in RUN_RECORDS if (output_dir / name).is_file()]
    found += sorted(str(p.relative_to(output_dir)) for p in output_dir.glob("checkpoints/*.ckpt"))
    if found:
        raise RunDirError(
            f"{output_dir} already holds a run ({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}); nothing "
            "was overwritten. To continue that run, add resume=auto with the same overrides and the same "
            "hydra.run.dir (its resume_command.txt has the command); to start a fresh run, leave hydra.run.dir out "
            "(a new time-stamped directory) or give a new hydra.run.dir"
        )


def resume_command(output_dir: Path) -> str | None:
    """The command that continues this run after an interruption: the same overrides, this run
    directory, ``resume=auto`` (``None`` outside a Hydra entry point)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized():
        return None
    task = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "hydra.run.dir="))]
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "train.py"
    return " ".join(
        ["python", script, *map(shlex.quote, task), shlex.quote(f"hydra.run.dir={output_dir.resolve()}"), "resume=auto"]
    )


def instantiate_dict(nodes: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a ``{name: node}`` group (callbacks, loggers); null
    entries are skipped so a recipe can switch one off with ``callbacks.lr_monitor=null``."""
    if not nodes:
        return []
    return [instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """``resume``: null, a checkpoint path, or ``auto`` (the newest checkpoint of this run dir, if any)."""
    return _resolve_resume(cfg.get("resume"), output_dir)


def system_callbacks(cfg: DictConfig, output_dir: Path) -> list[pl.Callback]:
    """Callbacks every run gets, whatever the callbacks group says."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return [LogConfigCallback(config, str(output_dir / "config_resolved.yaml"))]


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as the config says; returns the final logged metrics."""
    check_arch(cfg)  # before anything from the config is instantiated
    weights = check_initial_weights(cfg)
    conv_plan.configure(str(cfg.get("conv_plan") or "benchmark"))
    check_shared_run_dir()
    output_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(cfg, output_dir)  # before anything is written
    pl.seed_everything(cfg.seed, workers=True)

    strategy = ddp_strategy(cfg)
    if strategy != cfg.trainer.get("strategy"):
        log.info(
            "performance-priority supernet under DDP: strategy %s -> %s (an op sampled for no channel gets "
            "no gradient in that step)",
            cfg.trainer.strategy,
            strategy,
        )
        cfg.trainer.strategy = strategy

    loggers = instantiate_dict(cfg.get("logger"))
    try:
        return _fit(cfg, output_dir, loggers, weights)
    finally:
        finish_loggers(loggers)


def _fit(cfg: DictConfig, output_dir: Path, loggers: list[Any], weights: dict[str, Any]) -> dict[str, float]:
    callbacks = instantiate_dict(cfg.get("callbacks"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks + system_callbacks(cfg, output_dir), logger=loggers or False
    )

    # explicit batch sizes: per device (data.batch_size) and global (checked before anything runs)
    batch = resolve_batch_size(cfg.data.batch_size, cfg.get("global_batch_size"), **trainer_parallelism(trainer))
    if batch["per_device"] != cfg.data.batch_size:
        log.info(
            "global_batch_size %d = %d per device x %d device(s) x %d node(s) x %d accumulation: "
            "data.batch_size %d -> %d",
            batch["global"],
            batch["per_device"],
            batch["devices"],
            batch["num_nodes"],
            batch["accumulate"],
            cfg.data.batch_size,
            batch["per_device"],
        )
        cfg.data.batch_size = batch["per_device"]
    ckpt_path = resolve_resume(cfg, output_dir)
    record_run(
        cfg,
        output_dir,
        {
            "batch_size": batch,
            "strategy": str(cfg.trainer.get("strategy")),
            "resumed_from": ckpt_path,
            "initial_weights": weights,
        },
    )

    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    if hasattr(datamodule, "validate"):
        datamodule.validate()  # bad roots, lists, labels: fail here, before any model is built

    model = build_model(cfg.model)  # plain data, resolved once (arch files are data)
    if cfg.get("init"):
        apply_init(model.net, cfg.init)
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = final_metrics(trainer)
        if cfg.get("test"):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update(final_metrics(trainer))
    except SIGTERMException:
        # ResumeStateCallback has written last.ckpt: say "stopped, resumable" to the shell or scheduler
        # (exit 0 would let `search.py && train.py` carry on without metrics or export)
        log.warning(
            "stopped by SIGTERM: exit status %d; continue with resume=auto in %s (resume_command.txt)",
            EXIT_PREEMPTED,
            output_dir,
        )
        raise SystemExit(EXIT_PREEMPTED) from None
    if trainer.is_global_zero:
        write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        for callback in callbacks:
            command = retrain_command(callback, output_dir)
            if command:  # a search: say exactly how to retrain what it found
                write_atomic(output_dir / "retrain_command.txt", command + "\n")
                print(f"\nFound architecture: {callback.export_path}\nRetrain it with:\n  {command}\n", flush=True)
    return metrics


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's logged metrics as plain floats (without the log-only resume marker)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k != PARTIAL_EPOCH_KEY}


def retrain_command(callback: Any, output_dir: Path) -> str | None:
    """The retrain command of a pruning callback. Under ``ddp_spawn`` the export happened in a
    worker process: recover it from the copy in ``<run dir>/arch/``."""
    if not hasattr(callback, "retrain_command"):
        return None
    if callback.retrain_command:
        return callback.retrain_command
    copies = sorted((output_dir / "arch").glob("*.yaml"), key=lambda p: p.stat().st_mtime_ns)
    if not copies:
        return None
    callback.export_path = Path(callback.arch_dir) / "arch" / copies[-1].name
    callback.retrain_command = callback.command_for(callback.export_path)
    return callback.retrain_command
