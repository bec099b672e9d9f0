"""Loggers that behave on clusters: wandb never prompts, blocks or fails for lack of a key/network."""

from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_api_key_configured() -> bool:
    """An API key in the environment or in ``~/.netrc`` (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


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
        offline = mode in ("offline", "dryrun", "disabled") or not wandb_api_key_configured()
        if offline and mode not in ("offline", "dryrun", "disabled"):
            log.warning("wandb: no API key configured; logging offline under %s/wandb — "
                        "upload later with `wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    id_file = Path(save_dir) / "wandb_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        tmp = id_file.with_name(".wandb_run_id.tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, id=run_id, resume="allow",
                       **kwargs)
