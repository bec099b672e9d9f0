"""Trust under hostile files, signals and reruns (issue 14): one test per defect the reliability
probe found. Each reproduces the defect as the probe did and checks the behaviour now promised."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cakes.config import compose_config
from conftest import TINY_VIDEO

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_VIDEO,
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "test=false",
]


def env_with_src(**extra: str) -> dict[str, str]:
    """The environment of a child ``python``: this checkout's ``src`` first on the path."""
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", **extra}


@pytest.fixture()
def cakes_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    return tmp_path


def tiny_config(name: str, out: Path, *overrides: str):
    cfg = compose_config(name, [*TINY, *overrides])
    cfg.paths.output_dir = str(out)
    return cfg


def uniform_arch_for(cfg) -> dict:
    from test_configs import uniform_arch

    return uniform_arch(cfg.backbone)


class TermAtStep(pl.Callback):
    """SIGTERM to this process at the start of optimizer step ``step`` (as SLURM preemption would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- 1: checkpoint loading
def test_01_checkpoint_cannot_call_outside_the_project_builders(tmp_path: Path, monkeypatch):
    from cakes.modules import VideoClassificationModule

    cfg = compose_config("train", [*TINY])
    model = instantiate(cfg.model)
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    monkeypatch.chdir(tmp_path)
    evil = {
        "net": {"_target_": "os.makedirs", "_args_": [str(tmp_path / "pwned")]},
        "net.operator": {
            **ckpt["hyper_parameters"]["net"],
            "operator": {"_target_": "builtins.exec", "_args_": ["open('pwned2', 'w')"]},
        },
    }
    for where, net in evil.items():
        path = tmp_path / f"{where}.ckpt"
        torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "net": net}}, path)
        target = net["_target_"] if where == "net" else net["operator"]["_target_"]
        with pytest.raises(ValueError, match=rf"{where}\._target_.*{target}.*not one of the project's"):
            VideoClassificationModule.load_from_checkpoint(path, weights_only=True)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    # the project's own checkpoints still load
    torch.save(ckpt, tmp_path / "good.ckpt")
    VideoClassificationModule.load_from_checkpoint(tmp_path / "good.ckpt", weights_only=True)


# --------------------------------------------------------------------------- 2: export name, command, overwrite
def test_02_export_is_named_by_seed_absolute_and_never_overwrites(cakes_root: Path, monkeypatch):
    from cakes.arch import find_arch
    from cakes.ops.arch import load_arch, save_arch

    cfg = compose_config("search", [*TINY, "seed=7", f"paths.arch_dir={cakes_root / 'elsewhere'}"])
    assert cfg.callbacks.prune.name.endswith("_seed7")
    callback = instantiate(cfg.callbacks.prune)
    model = instantiate(cfg.model)
    run_dir = cakes_root / "run"
    trainer = SimpleNamespace(
        is_global_zero=True,
        default_root_dir=str(run_dir),
        checkpoint_callback=None,
        current_epoch=0,
        global_step=1,
        loggers=[],
    )
    # a different arch of the same name in ./found/arch (the cwd), where a bare name would resolve
    monkeypatch.chdir(cakes_root)
    decoy = cakes_root / "found" / "arch" / f"{cfg.callbacks.prune.name}.yaml"
    decoy.parent.mkdir(parents=True)
    decoy.write_text((ROOT / "archs" / "ssv1_cakes12d_c.yaml").read_text())
    path = callback.export(trainer, model)
    assert path.is_absolute() and path.parent == cakes_root / "elsewhere" / "arch"
    arch_arg = callback.retrain_command.split("arch=")[-1]
    assert Path(arch_arg) == path and find_arch(arch_arg, cfg.paths.arch_dir) == path
    # exclusive creation: an existing, different file is never replaced
    other = load_arch(ROOT / "archs" / "ssv1_cakes12d_c.yaml")
    before = path.read_text()
    with pytest.raises(FileExistsError, match=str(path)):
        save_arch(other, path, exclusive=True)
    assert path.read_text() == before
    # two runs that chose the same name: the second gets the next free one
    second = instantiate(cfg.callbacks.prune)
    trainer.default_root_dir = str(cakes_root / "run2")
    assert second.export(trainer, model) == path.with_name(f"{path.stem}_1.yaml")
    assert path.read_text() == before


# --------------------------------------------------------------------------- 3 + 5: SIGTERM and resume
@pytest.fixture(scope="module")
def stopped_then_resumed(tmp_path_factory) -> dict:
    """A run SIGTERMed at the start of step 2 (epoch 1, batch 0 of 2 per epoch), then resumed."""
    from cakes.run import run

    root = tmp_path_factory.mktemp("sigterm")
    old = os.environ.get("CAKES_ROOT")
    os.environ["CAKES_ROOT"] = str(root)
    try:
        overrides = ["trainer.max_epochs=2", "trainer.log_every_n_steps=1", "trainer.deterministic=true"]
        cfg = tiny_config("train", root / "run", *overrides)
        cfg.callbacks.term = {"_target_": f"{__name__}.TermAtStep", "step": 2}
        with pytest.raises(SystemExit) as stop:
            run(cfg)
        last = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=True)
        run(tiny_config("train", root / "run", *overrides, "resume=auto"))
    finally:
        if old is None:
            os.environ.pop("CAKES_ROOT", None)
        else:
            os.environ["CAKES_ROOT"] = old
    return {"code": stop.value.code, "last": last, "run": root / "run"}


def test_03_sigterm_exits_143_after_the_checkpoint(stopped_then_resumed):
    assert stopped_then_resumed["code"] == 143
    assert stopped_then_resumed["last"]["global_step"] == 3  # the step in flight was finished and saved


def test_05_resumed_partial_epoch_is_marked_in_the_log(stopped_then_resumed):
    rows = list(csv.DictReader((stopped_then_resumed["run"] / "csv" / "metrics.csv").open()))
    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    marks = {int(r["epoch"]): r.get("resumed_partial_epoch") for r in epoch_rows}
    assert marks.get(1) == "1.0", marks  # epoch 1 was interrupted after 1 of its 2 batches
    assert not marks.get(0)
    import json

    assert "resumed_partial_epoch" not in json.loads((stopped_then_resumed["run"] / "metrics.json").read_text())


# --------------------------------------------------------------------------- 4: truncated / bad volumes
@pytest.fixture()
def msd(tmp_path: Path):
    from cakes.data.synthetic_volume import generate_synthetic_msd

    root = tmp_path / "msd"
    generate_synthetic_msd(root, num_cases=5, shape=(24, 24, 8))
    return root


def msd_module(root: Path):
    from cakes.datamodules.msd import MSDDataModule

    return MSDDataModule(
        root,
        num_classes=3,
        regions={"pancreas": [1, 2]},
        patch_size=(16, 16, 8),
        spacing=(2.0, 2.0, 2.0),
        batch_size=2,
        crops_per_volume=2,
        num_workers=0,
        rotate_planes=[[0, 1]],
    )


def test_04_truncated_or_bad_volumes_are_named(msd: Path):
    import nibabel as nib
    import numpy as np

    image = msd / "imagesTr" / "pancreas_001.nii.gz"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    with pytest.raises(ValueError, match=rf"case 'pancreas_001'.*{image}"):
        msd_module(msd).validate()  # the pre-flight check, before any model is built
    # at training time (no pre-flight): the error names the case and the file
    dm = msd_module(msd)
    dm.split = {"train": ["pancreas_001", "pancreas_002"], "val": ["pancreas_003"], "source": "test"}
    dm.setup("fit")
    from cakes.datamodules.volume import SeededSamples

    with pytest.raises(Exception, match=rf"case 'pancreas_001'.*{image}") as err:
        SeededSamples(dm.train_set)[(0, 1)]
    assert "applying transform" not in str(err.value).splitlines()[0]
    # a label value outside the label set, found while loading
    label = msd / "labelsTr" / "pancreas_002.nii.gz"
    loaded = nib.load(label)
    values = np.asanyarray(loaded.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, loaded.affine), label)
    with pytest.raises(Exception, match=rf"case 'pancreas_002'.*{label}") as err:
        SeededSamples(dm.train_set)[(1, 1)]
    assert "values [7" in str(err.value) and "applying transform" not in str(err.value).splitlines()[0]


# --------------------------------------------------------------------------- 6: binary arch file
def test_06_binary_arch_file_names_path_and_format(tmp_path: Path):
    from cakes.ops.arch import ArchError, load_arch

    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 8)
    with pytest.raises(ArchError, match=rf"{path}.*UTF-8 YAML"):
        load_arch(path)


# --------------------------------------------------------------------------- 7: file modes
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_07_written_files_get_the_umask_mode(tmp_path: Path, umask: int, mode: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cakes.figures import save_figure
    from cakes.files import write_atomic
    from cakes.ops.arch import load_arch, save_arch

    old = os.umask(umask)
    try:
        paths = [
            save_arch(load_arch(ROOT / "archs" / "ssv1_cakes12d_c.yaml"), tmp_path / "a.yaml"),
            save_figure(plt.figure(), tmp_path / "f.png"),
        ]
        write_atomic(tmp_path / "x.txt", "x\n")
        write_atomic(tmp_path / "y.json", b"{}")
        paths += [tmp_path / "x.txt", tmp_path / "y.json"]
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == {p.name: oct(mode) for p in paths}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


# --------------------------------------------------------------------------- 8: arch files are data
def test_08_interpolation_in_an_arch_file_stays_literal(cakes_root: Path):
    from cakes.modules import VideoClassificationModule
    from cakes.run import run

    cfg = compose_config("train", [*TINY, "experiment=demo_cakes", "arch=ssv1_cakes12d_c"])
    arch = uniform_arch_for(cfg)
    arch["meta"] = {"note": "${oc.env:HOME}", "escaped": "\\${x}", "plain": "a $ b"}
    (cakes_root / "found" / "arch").mkdir(parents=True)
    (cakes_root / "found" / "arch" / "interp.yaml").write_text(yaml.safe_dump(arch))
    cfg = tiny_config("train", cakes_root / "run", "experiment=demo_cakes", "arch=interp")
    assert OmegaConf.to_container(cfg, resolve=True)["operator"]["arch"]["meta"] == arch["meta"]
    run(cfg)
    saved = yaml.safe_load((cakes_root / "run" / "config_resolved.yaml").read_text())
    assert saved["operator"]["arch"]["meta"] == arch["meta"]
    ckpt = cakes_root / "run" / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert stored["net"]["operator"]["arch"]["meta"] == arch["meta"]
    model = VideoClassificationModule.load_from_checkpoint(ckpt, weights_only=True)
    assert model.hparams.net["operator"]["arch"]["meta"] == arch["meta"]


# --------------------------------------------------------------------------- 9: reruns
def test_09_rerun_in_an_existing_run_dir_is_refused(cakes_root: Path):
    from cakes.run import RunDirError, run

    out = cakes_root / "run"
    (out / "checkpoints").mkdir(parents=True)
    records = {
        name: f"first run's {name}\n" for name in ("config_resolved.yaml", "run_info.json", "checkpoints/last.ckpt")
    }
    for name, text in records.items():
        (out / name).write_text(text)
    with pytest.raises(RunDirError, match=r"resume=auto.*hydra\.run\.dir") as err:
        run(tiny_config("train", out))
    assert str(out) in str(err.value)
    assert {name: (out / name).read_text() for name in records} == records


# --------------------------------------------------------------------------- 10: profile and check_data
def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_10_profile_and_check_data_fail_cleanly_and_use_the_working_copy(tmp_path: Path):
    env = env_with_src(CAKES_ROOT=str(tmp_path))
    env.pop("CAKES_CONF_DIR", None)

    def cmd(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )

    for module in ("cakes.profile", "cakes.check_data"):
        helped = cmd(module, "--help")
        assert helped.returncode == 0 and "usage" in helped.stdout.lower() and not helped.stderr.strip()
        one_line_error(cmd(module, "experiment=demo_cakes", "arch=no_such_arch"), "no_such_arch")
        one_line_error(cmd(module, "experiment=demo_c3d", "trainer.max_epochz=1"), "trainer.max_epochz")
    # a working copy of the project (its own conf/ and train.py): its configs, not the package's
    copy = tmp_path / "copy"
    copy.mkdir()
    subprocess.run(["cp", "-r", str(ROOT / "conf"), str(ROOT / "archs"), str(ROOT / "train.py"), str(copy)], check=True)
    (copy / "conf" / "experiment" / "only_in_copy.yaml").write_text(
        (ROOT / "conf" / "experiment" / "demo_c3d.yaml").read_text()
    )
    result = cmd("cakes.profile", "experiment=only_in_copy", cwd=copy)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------- 11: smaller messages
def test_11_messages_name_the_field_file_and_minimum(cakes_root: Path):
    from cakes.ops.arch import ArchError
    from cakes.distributed import BatchSizeError, resolve_batch_size
    from cakes.run import run

    with pytest.raises(BatchSizeError, match=r"global_batch_size.*integer.*'abc'"):
        resolve_batch_size(4, "abc", devices=1)
    cfg = compose_config("train", [*TINY, "++global_batch_size=abc"])
    cfg.paths.output_dir = str(cakes_root / "gbs")
    with pytest.raises(BatchSizeError, match=r"global_batch_size.*integer"):
        run(cfg)
    # an arch whose widths do not fit: the message names the file
    cfg = compose_config("train", [*TINY, "experiment=demo_cakes", "arch=ssv1_cakes12d_c"])
    arch = uniform_arch_for(cfg)
    arch["layers"]["layer1.0"] = {"1x3x3": 1, "3x1x1": 1, "3x3x3": 1}
    path = cakes_root / "found" / "arch" / "narrow.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(arch))
    cfg = tiny_config("train", cakes_root / "narrow", "experiment=demo_cakes", "arch=narrow")
    with pytest.raises(ArchError, match=rf"^{path}: layer 'layer1.0'"):
        run(cfg)
    assert not (cakes_root / "narrow").exists()
    # a patch too small for C2FNAS: named before the network runs
    cfg = compose_config("train", ["experiment=demo_msd_c3d", "data.patch_size=[16,16,16]"])
    from cakes.builders import build_model

    with pytest.raises(ValueError, match=r"data\.patch_size.*\[16, 16, 16\].*at least 32"):
        build_model(cfg.model)  # as train.py builds it


# --------------------------------------------------------------------------- 12: ImageNet keys
def test_12_missing_slot_weights_are_named_by_full_key():
    from cakes.backbones import ResNet3d
    from cakes.ops import Homogeneous
    from test_resnet3d import torchvision_state

    def load(state):
        net = ResNet3d(operator=Homogeneous("c2d"), width=0.25, num_classes=10)
        return net.load_imagenet(state)

    full = torchvision_state(50, 0.25)
    load(full)  # complete: fine
    no_conv = {k: v for k, v in full.items() if k != "layer2.0.conv2.weight"}
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight"):
        load(no_conv)
    no_slot = {k: v for k, v in no_conv.items() if not k.startswith("layer2.0.bn2.")}
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight") as err:
        load(no_slot)
    assert "layer2.0.bn2.weight" in str(err.value)
    no_var = {k: v for k, v in full.items() if k != "layer2.0.bn2.running_var"}
    with pytest.raises(ValueError, match=r"layer2\.0\.bn2\.running_var"):
        load(no_var)
