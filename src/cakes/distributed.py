"""Scaling out: the global batch (checked before training), DDP strategy choices that depend on
the model, and one run directory for every process of a run."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: DDP strategies whose ``find_unused_parameters`` we may switch on for a performance-priority search
PLAIN_DDP = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


class BatchSizeError(ValueError):
    """The global batch does not split evenly over devices × nodes × accumulation."""


def global_batch(per_device: int, devices: int, num_nodes: int = 1, accumulate: int = 1) -> int:
    """The global batch: per-device batch × devices × nodes × gradient accumulation (the same
    product ``CakesModule.global_batch_size`` uses for the linear lr scaling)."""
    return int(per_device) * int(devices) * int(num_nodes) * int(accumulate)


def trainer_parallelism(trainer: Any) -> dict[str, int]:
    """``devices`` (per node), ``num_nodes`` and ``accumulate`` of a built Trainer."""
    return {
        "devices": int(trainer.num_devices),
        "num_nodes": int(trainer.num_nodes),
        "accumulate": int(trainer.accumulate_grad_batches),
    }


def positive_int(value: Any, field: str, *, optional: bool = False) -> int | None:
    """``value`` as a positive integer, else :class:`BatchSizeError` naming ``field`` (a command-line
    override such as ``++global_batch_size=abc`` arrives as a string)."""
    if value is None and optional:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
    if number is None or number < 1:
        raise BatchSizeError(f"{field}: expected a positive integer{' (or null)' if optional else ''}, got {value!r}")
    return number


def resolve_batch_size(
    per_device: Any, global_batch_size: Any, *, devices: int, num_nodes: int = 1, accumulate: int = 1
) -> dict[str, int]:
    """The per-device and global batch of a run.

    ``global_batch_size=None``: the global batch is ``per_device × devices × num_nodes ×
    accumulate``. Otherwise it must divide evenly by ``devices × num_nodes × accumulate`` and
    the per-device batch becomes the quotient (replacing ``per_device``).

    Raises:
        BatchSizeError: naming the field when a size is not a positive integer, and every number when
            the global batch does not divide.
    """
    split = int(devices) * int(num_nodes) * int(accumulate)
    per_device = positive_int(per_device, "data.batch_size")
    gbs = positive_int(global_batch_size, "global_batch_size", optional=True)
    if gbs is None:
        per = int(per_device)
    else:
        if gbs < 1 or gbs % split:
            raise BatchSizeError(
                f"global_batch_size={gbs} does not split evenly over {devices} device(s) x {num_nodes} node(s) x "
                f"{accumulate} accumulation step(s) = {split} per-device batches "
                f"(nearest valid: {max(split, gbs - gbs % split)} or {gbs - gbs % split + split}); "
                "change global_batch_size, trainer.devices, trainer.num_nodes or trainer.accumulate_grad_batches"
            )
        per = gbs // split
    return {
        "per_device": per,
        "global": per * split,
        "devices": int(devices),
        "num_nodes": int(num_nodes),
        "accumulate": int(accumulate),
    }


def needs_unused_parameter_search(cfg: DictConfig) -> bool:
    """A performance-priority supernet: an op that no channel sampled in a step gets no gradient."""
    target = (cfg.get("operator") or {}).get("_target_")
    if not target:
        return False
    from hydra.utils import get_class

    try:
        return getattr(get_class(target), "search_mode", None) == "performance"
    except (ImportError, AttributeError, ValueError):
        return False


def ddp_strategy(cfg: DictConfig) -> str | None:
    """The strategy to use: a plain DDP strategy gets ``_find_unused_parameters_true`` for a
    performance-priority supernet (and only then); anything else is returned unchanged."""
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, str) and strategy in PLAIN_DDP and needs_unused_parameter_search(cfg):
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def external_launch() -> str | None:
    """``torchrun`` / ``srun`` when this process is one of several started by a launcher (each of
    which composed its own config), else ``None``."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "srun"
    return None


def check_shared_run_dir() -> None:
    """Under ``torchrun`` or ``srun`` every process composes its own config; with the default
    time-stamped ``hydra.run.dir`` each would get its own run directory. Require an explicit one
    (the same for all processes) before anything is written. Multiruns (the submitit launcher)
    and Lightning's own DDP launcher already share one directory."""
    launcher = external_launch()
    if launcher is None:
        return
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return
    if any(str(o).startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        return
    job = "${SLURM_JOB_ID}" if launcher == "srun" else "<a name shared by all processes>"
    raise RuntimeError(
        f"started by {launcher} with {os.environ.get('WORLD_SIZE') or os.environ.get('SLURM_NTASKS')} processes, "
        "but without hydra.run.dir: each process would write its own time-stamped run directory. Pass the same "
        f"directory to all of them, e.g. hydra.run.dir=logs/<task>/runs/{job}"
    )
