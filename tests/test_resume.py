"""Fault tolerance: a run killed (SIGKILL) or stopped (SIGTERM) and continued with resume=auto in the
same run directory ends bit-identical to an uninterrupted run; checkpoints are plain data."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cakes.config import compose_config
from conftest import TINY_VIDEO
from cakes.checkpoints import newest_checkpoint, resolve_resume
from cakes.run import run
from cakes.sampler import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_VIDEO, "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
# 3 epochs x 3 batches, a periodic checkpoint every 2 steps (so steps 2, 4, 6, 8: two of them mid-epoch)
RESUMABLE = [
    "trainer.max_epochs=3",
    "+trainer.limit_train_batches=3",
    "trainer.deterministic=true",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "test=false",
]
PAUSE_ENV = "CAKES_TEST_PAUSE_AT_STEP"


class PauseAtStep(pl.Callback):
    """Test helper: when ``$CAKES_TEST_PAUSE_AT_STEP`` is set, write ``<run dir>/paused`` after that
    optimizer step and wait to be killed."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = os.environ.get(PAUSE_ENV)
        if at and trainer.global_step == int(at):
            (Path(trainer.default_root_dir) / "paused").write_text(str(trainer.global_step))
            time.sleep(600)


class TermAtStep(pl.Callback):
    """Test helper: SIGTERM to this process at the start of a step (as SLURM preemption would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def assert_same_final_state(a: Path, b: Path, step: int = 9, epoch: int = 2, module: str = "VideoClassificationModule"):
    ca = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"]) == (step, epoch)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    different = [k for k in ca["state_dict"] if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    moments_a = [s["momentum_buffer"] for s in ca["optimizer_states"][0]["state"].values()]
    moments_b = [s["momentum_buffer"] for s in cb["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(moments_a, moments_b, strict=True))
    # plain data: the module rebuilds from the checkpoint alone under weights_only=True
    import cakes.modules

    model = getattr(cakes.modules, module).load_from_checkpoint(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(model.state_dict()[next(iter(cb["state_dict"]))], next(iter(cb["state_dict"].values())))


# --------------------------------------------------------------------------- pieces
def test_newest_complete_checkpoint_is_chosen(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert newest_checkpoint(tmp_path) is None and resolve_resume("auto", tmp_path) is None
    torch.save({"a": 1}, folder / "epoch000.ckpt")
    time.sleep(0.01)
    torch.save({"a": 2}, folder / "last.ckpt")
    assert resolve_resume("auto", tmp_path) == str(folder / "last.ckpt")
    time.sleep(0.01)
    (folder / "periodic-step0000010.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:100])  # killed mid-write
    assert newest_checkpoint(tmp_path) == folder / "last.ckpt"
    time.sleep(0.01)
    torch.save({"a": 3}, tmp_path / "hpc_ckpt_1.ckpt")  # Lightning's SLURM requeue save
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="resume=auto"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def test_resumable_sampler_is_pure_and_starts_mid_epoch():
    data = list(range(10))
    full = ResumableSampler(data, batch_size=2, seed=3)
    full.set_epoch(4)
    order = list(full)
    assert order != list(range(10)) and sorted(order) == data
    assert list(ResumableSampler(data, batch_size=2, seed=3, start=(4, 3))) == order[6:]
    ranks = [list(ResumableSampler(data, batch_size=2, seed=3, num_replicas=3, rank=r, epoch=4)) for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(order[:9]) and len({len(r) for r in ranks}) == 1
    seeded = list(ResumableSampler(data, batch_size=2, seed=3, with_seeds=True, epoch=4))
    assert [i for i, _ in seeded] == order and len({s for _, s in seeded}) == 10


# --------------------------------------------------------------------------- end to end
def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=demo_c3d",
        *TINY,
        *RESUMABLE,
        "+callbacks.pause._target_=test_resume.PauseAtStep",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_stratified_order_balances_every_batch_and_stays_resumable():
    labels = [i % 4 for i in range(96)]  # 4 classes x 24
    sampler = ResumableSampler(range(96), batch_size=16, seed=3, labels=labels, epoch=2)
    order = list(sampler)
    assert sorted(order) == list(range(96))
    for start in range(0, 96, 16):
        batch = [labels[i] for i in order[start : start + 16]]
        assert [batch.count(c) for c in range(4)] == [4, 4, 4, 4]
    assert order == list(ResumableSampler(range(96), batch_size=16, seed=3, labels=labels, epoch=2))
    assert order != list(ResumableSampler(range(96), batch_size=16, seed=3, labels=labels, epoch=3))
    assert order != list(ResumableSampler(range(96), batch_size=16, seed=3, epoch=2))  # plain shuffle differs
    resumed = ResumableSampler(range(96), batch_size=16, seed=3, labels=labels, start=(2, 3))
    assert list(resumed) == order[48:]
    uneven = ResumableSampler(range(10), batch_size=2, seed=0, labels=[0] * 7 + [1] * 3)
    assert sorted(uneven) == list(range(10))  # classes of different sizes: every item once
    with pytest.raises(ValueError, match="labels: one per item expected, got 3 for 10 items"):
        ResumableSampler(range(10), batch_size=2, labels=[0, 1, 0])


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    env = {
        **os.environ,
        "CAKES_ROOT": str(tmp_path),
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    }  # this checkout's code
    env.pop(PAUSE_ENV, None)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    # the killed run: paused after step 5 (periodic checkpoint at step 4, mid-epoch), then SIGKILL
    proc = subprocess.Popen(
        train_cmd(killed),
        cwd=ROOT,
        env={**env, PAUSE_ENV: "5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # meanwhile, the uninterrupted run
    result = subprocess.run(train_cmd(whole), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    deadline = time.time() + 300
    while not (killed / "paused").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 5"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert newest_checkpoint(killed).name == "periodic-step0000004.ckpt"

    # the command the run recorded: the same overrides, resume=auto, the same run directory
    command = (killed / "resume_command.txt").read_text().strip()
    assert command.endswith(f"hydra.run.dir={killed} resume=auto") and "experiment=demo_c3d" in command
    result = subprocess.run(
        shlex.split(command.replace("python", sys.executable, 1)),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "periodic-step0000004.ckpt" in (killed / "run_info.resume1.json").read_text()
    assert_same_final_state(whole, killed)


def stop_then_resume(config, tmp_path: Path, step: int) -> dict:
    """``config(out, *overrides)`` run uninterrupted into ``whole``, and into ``stopped`` with a
    SIGTERM at the start of ``step`` (exit status 143) continued by ``resume=auto``. Returns the
    checkpoint the stopped run left."""
    run(config(tmp_path / "whole"))
    cfg = config(tmp_path / "stopped")
    cfg.callbacks.term = {"_target_": f"{__name__}.TermAtStep", "step": step}
    with pytest.raises(SystemExit) as stop:
        run(cfg)
    assert stop.value.code == 143  # stopped after saving: resumable (docs/operations.md#exit-status)
    last = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    run(config(tmp_path / "stopped", "resume=auto"))
    return last


@pytest.mark.slow
def test_sigterm_saves_last_and_resume_matches(tmp_path, monkeypatch):
    """SIGTERM (preemption): the step in flight finishes, last.ckpt is written, the process exits
    with status 143; resume=auto continues from it (a search: supernet state and sampling too)."""
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))

    def config(out: Path, *extra: str):
        cfg = compose_config(
            "search",
            [
                *TINY,
                *RESUMABLE,
                "operator=performance_priority",
                "search.lasso=0",
                # one warm-up epoch: the resumes cross the full-kernel/sampling boundary
                "search.shared_kernel=true",
                "search.full_kernel_epochs=1",
                *extra,
            ],
        )
        cfg.paths.output_dir = str(out)
        return cfg

    last = stop_then_resume(config, tmp_path, step=4)
    assert last["global_step"] == 5  # the step in flight when the signal came
    assert_same_final_state(tmp_path / "whole", tmp_path / "stopped")
    # the CSV log is continued, not replaced
    import csv

    rows = list(csv.DictReader((tmp_path / "stopped" / "csv" / "metrics.csv").open()))
    steps = {int(r["step"]) for r in rows if r.get("train/loss_step")}
    assert min(steps) < 5 < max(steps)
    from cakes.ops.arch import load_arch

    exports = [load_arch(p).meta["run_dir"] for p in (tmp_path / "found" / "arch").glob("*.yaml")]
    assert sorted(Path(d).name for d in exports) == ["stopped", "whole"]  # one export per run


@pytest.mark.slow
def test_volume_run_resumed_mid_epoch_matches(tmp_path, monkeypatch):
    """The volumetric track: SIGTERM in the middle of an epoch, resume=auto; order and random crops
    continue where they stopped (per-sample seeds), so the end state is bit-identical."""
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    from test_segmentation import FAST

    def config(out: Path, *extra: str):
        # 4 training cases, one per step: epochs of 4 steps; stop after step 2, end at step 6
        cfg = compose_config(
            "train",
            [
                "experiment=demo_msd_c3d",
                *FAST,
                "trainer.max_steps=6",
                "trainer.val_check_interval=3",
                "trainer.deterministic=true",
                "test=false",
                *extra,
            ],
        )
        cfg.paths.output_dir = str(out)
        return cfg

    last = stop_then_resume(config, tmp_path, step=1)
    assert (last["global_step"], last["epoch"]) == (2, 0)  # mid-epoch
    assert_same_final_state(
        tmp_path / "whole", tmp_path / "stopped", step=6, epoch=1, module="VolumeSegmentationModule"
    )
