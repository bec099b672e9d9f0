"""logger=wandb on a machine with no API key and WANDB_MODE unset: offline, never prompting or failing;
metrics, hyper-parameters, the resolved config, the found-arch plot and yaml stored in the local run;
a resumed run continues the same wandb run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import TINY_VIDEO

from cakes.config import compose_config
from cakes.loggers import wandb_api_key_configured
from cakes.run import run

# the shared tiny synthetic set (conftest.TINY_VIDEO), two training batches and one validation batch
TINY = [*TINY_VIDEO, "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


@pytest.fixture()
def no_wandb_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc, no wandb settings
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    assert not wandb_api_key_configured()
    return tmp_path


def records(run_dir: Path, expected: tuple[bytes, ...] = (), timeout: float = 60.0) -> bytes:
    """The raw records of every offline wandb run in a run directory (metrics, config, artifacts).

    wandb's service process writes the file; on a loaded machine its last records can land just
    after ``wandb.finish()`` returns, so wait (bounded) until every ``expected`` key is there."""
    deadline = time.monotonic() + timeout
    while True:
        data = b"".join(p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        if all(key in data for key in expected) or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


@pytest.mark.slow
def test_wandb_without_key_logs_offline_and_resumes_the_same_run(no_wandb_key: Path, capsys):
    out = no_wandb_key / "search"
    cfg = compose_config("search", [*TINY, "logger=wandb", "trainer.max_epochs=1"])
    cfg.paths.output_dir = str(out)
    run(cfg)
    assert "wandb sync" in capsys.readouterr().out  # says how to upload

    run_id = (out / "wandb_run_id").read_text().strip()
    (first,) = (out / "wandb").glob("offline-run-*")
    assert first.name.endswith(run_id)
    # metrics, hyper-parameters, the arch yaml and config artifacts
    expected = (
        b"train/loss",
        b"val/top1",
        b"found/found_gmacs",
        b"model/params",
        b"lasso",
        b"cakes-arch",
        b"config-" + run_id.encode(),
    )
    data = records(out, expected)
    for key in expected:
        assert key in data, key
    assert (first / "files" / "config_resolved.yaml").is_file()
    assert list((first / "files" / "media" / "images").glob("found/arch_*.png"))  # the found-arch plot

    # continue the search for one more epoch in the same run directory: the same wandb run
    cfg = compose_config("search", [*TINY, "logger=wandb", "trainer.max_epochs=2", "resume=auto"])
    cfg.paths.output_dir = str(out)
    run(cfg)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
