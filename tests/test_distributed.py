"""Scaling out on CPU: batch-size arithmetic and checks, the DDP strategy choice, one run directory
per run under every launcher, and 2-process DDP (gloo) search → retrain end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cakes.ops.arch import load_arch
from conftest import TINY_VIDEO
from cakes.config import compose_config
from cakes.data.synthetic_video import generate_synthetic_ssv1
from cakes.distributed import BatchSizeError, ddp_strategy, global_batch, resolve_batch_size
from cakes.modules.base import CakesModule

ROOT = Path(__file__).resolve().parents[1]
# the shared tiny synthetic set (conftest.TINY_VIDEO), a couple of batches
TINY = [*TINY_VIDEO, "+trainer.limit_train_batches=2", "trainer.log_every_n_steps=1"]
GENERATION = {"num_classes": 4, "train_per_class": 4, "val_per_class": 2, "num_frames": 8, "height": 40, "width": 48}


# --------------------------------------------------------------------------- batch sizes, strategy
def test_global_batch_is_derived_or_checked():
    assert resolve_batch_size(12, None, devices=8)["global"] == 96
    assert resolve_batch_size(12, None, devices=8, num_nodes=2, accumulate=2)["global"] == 384
    split = resolve_batch_size(999, 96, devices=8, num_nodes=2)
    assert (split["per_device"], split["global"]) == (6, 96)
    with pytest.raises(
        BatchSizeError,
        match=r"global_batch_size=96 does not split evenly over 7 device\(s\) x "
        r"1 node\(s\) x 1 accumulation step\(s\) = 7",
    ):
        resolve_batch_size(12, 96, devices=7)
    with pytest.raises(BatchSizeError, match="= 32 per-device"):
        resolve_batch_size(12, 48, devices=8, num_nodes=2, accumulate=2)


def test_lr_scaling_uses_the_same_global_batch():
    """CakesModule scales lr by per-device × world size × accumulation: the same product."""
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=6), world_size=16, accumulate_grad_batches=2)
    module = SimpleNamespace(trainer=trainer)
    assert CakesModule.global_batch_size(module) == global_batch(6, devices=8, num_nodes=2, accumulate=2) == 192


def test_global_batch_size_is_checked_before_training(tmp_path, monkeypatch):
    from cakes.run import run

    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    cfg = compose_config("train", [*TINY, "trainer=ddp_cpu", "++global_batch_size=9"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(BatchSizeError, match=r"global_batch_size=9 .* 2 device\(s\)"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "operator, strategy, expected",
    [
        ("performance_priority", "ddp", "ddp_find_unused_parameters_true"),
        ("performance_priority", "ddp_spawn", "ddp_spawn_find_unused_parameters_true"),
        ("performance_priority", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_true"),
        ("performance_priority", "auto", "auto"),
        ("cost_priority", "ddp", "ddp"),
    ],
)
def test_find_unused_parameters_only_for_performance_priority(operator, strategy, expected):
    cfg = compose_config("search", [f"operator={operator}", f"trainer.strategy={strategy}"])
    assert ddp_strategy(cfg) == expected
    assert ddp_strategy(compose_config("train", ["experiment=demo_c3d", "trainer.strategy=ddp"])) == "ddp"


def test_torchrun_without_a_shared_run_dir_is_refused(tmp_path):
    """Every torchrun/srun process composes its own config: a time-stamped run dir would differ."""
    env = {
        **os.environ,
        "CAKES_ROOT": str(tmp_path),
        "TORCHELASTIC_RUN_ID": "t",
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
    }
    result = subprocess.run(
        [sys.executable, "train.py", "experiment=demo_c3d", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "without hydra.run.dir" in result.stderr + result.stdout
    assert not list((tmp_path / "logs").glob("**/checkpoints"))


# --------------------------------------------------------------------------- 2 processes end to end
def odd_val_set(root: Path) -> int:
    """The synthetic set with one validation video dropped: 7 videos, which 2 ranks cannot split."""
    generate_synthetic_ssv1(root, **GENERATION)
    val = root / "something-something-v1-validation.csv"
    lines = val.read_text().splitlines()[:-1]
    val.write_text("\n".join(lines) + "\n")
    return len(lines)


def run_dirs(root: Path, task: str) -> list[Path]:
    return sorted(p for p in (root / "logs" / task / "runs").iterdir() if p.is_dir())


@pytest.mark.slow
def test_ddp_search_and_retrain_one_run_dir_each(tmp_path):
    """search.py under ddp_spawn and train.py under Lightning's subprocess ddp, 2 gloo ranks each: one run
    directory and one arch yaml, every validation/test video counted once, the global batch in the record."""
    data = tmp_path / "ssv1"
    n_val = odd_val_set(data)
    env = {**os.environ, "CAKES_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    common = [*TINY, f"data.root={data}", "trainer=ddp_cpu", "++trainer.limit_val_batches=1.0", "trainer.max_epochs=1"]
    search = subprocess.run(
        [sys.executable, "search.py", *common], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert search.returncode == 0, search.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "demo_search")
    exports = list((tmp_path / "found" / "arch").glob("*.yaml"))
    assert len(exports) == 1 and [p.name for p in (run_dir / "arch").glob("*.yaml")] == [exports[0].name]
    arch = load_arch(exports[0])
    assert arch.backbone == "resnet3d" and arch.meta["run_dir"] == str(run_dir.resolve())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/videos"] == n_val == 7
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["batch_size"] == {"per_device": 4, "global": 8, "devices": 2, "num_nodes": 1, "accumulate": 1}
    command = (run_dir / "retrain_command.txt").read_text().strip()
    assert command.endswith(f"arch={exports[0]}")  # by absolute path

    # retrain what was found, with plain ddp: Lightning re-launches train.py with hydra.run.dir
    retrain = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=demo_cakes",
            f"arch={exports[0].stem}",
            *common,
            "trainer.strategy=ddp",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "demo_cakes")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/videos"] == metrics["test/videos"] == n_val
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    lr = compose_config("train", ["experiment=demo_cakes"]).model.optimizer.lr
    assert groups[0]["initial_lr"] == pytest.approx(lr * 8 / 16)  # lr × global batch 8 / base batch 16
    assert len(list((tmp_path / "logs").glob("*/runs/*"))) == 2  # no directory per rank
