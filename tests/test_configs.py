"""Every recipe composes (train.yaml, or search.yaml for the supernet recipes) and instantiates —
network on the meta device, data module, callbacks — and the trainer / logger groups compose.
The template's ``experiment=glob(*)`` smoke test, fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from cakes.config import compose_config
from cakes.utils import conf_dir
from cakes.ops.subkernel import resolve_op_set
from cakes.run import instantiate_dict

EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))
SEARCH_OPERATORS = ("cost_priority", "performance_priority")
OP_SETS = {"resnet3d": "c123d", "c2fnas": "v123d"}


def recipe_defaults(name: str) -> dict[str, str]:
    """The group choices a recipe makes itself or through the recipes it extends."""
    choices: dict[str, str] = {}
    data = yaml.safe_load((conf_dir() / "experiment" / f"{name}.yaml").read_text()) or {}
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            choices = {**recipe_defaults(entry), **choices}
        elif isinstance(entry, dict):
            for key, value in entry.items():
                choices[key.replace("override /", "").lstrip("/")] = value
    return choices


def is_search(name: str) -> bool:
    return recipe_defaults(name).get("operator") in SEARCH_OPERATORS


def uniform_arch(backbone_cfg) -> dict:
    """A valid arch for a backbone config: every slot split evenly over the op set."""
    cls = get_class(backbone_cfg._target_)
    kwargs = {k: backbone_cfg[k] for k in ("depth", "width") if k in backbone_cfg}
    slots = cls.slots(**kwargs)
    names = resolve_op_set(OP_SETS[cls.name]).names
    layers = {}
    for layer, width in slots.items():
        counts = {n: width // len(names) for n in names}
        counts[names[0]] += width - sum(counts.values())
        layers[layer] = counts
    return {"backbone": cls.name, "op_set": OP_SETS[cls.name], "layers": layers}


@pytest.fixture()
def cakes_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    return tmp_path


def test_search_recipes_are_found():
    searches = [e for e in EXPERIMENTS if is_search(e)]
    assert {"demo_search", "demo_msd_search", "msd_search", "ssv1_search_cost", "ssv1_search_perf"} <= set(searches)
    assert not is_search("ssv1_cakes") and not is_search("demo_c3d")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment: str, cakes_root: Path):
    config = "search" if is_search(experiment) else "train"
    overrides = [f"experiment={experiment}"]
    try:
        cfg = compose_config(config, overrides)
    except Exception as err:  # noqa: BLE001 - a recipe that needs arch=<name>
        if "arch" not in str(err) and "???" not in str(err):
            raise
        cfg = None
    if cfg is None or (cfg.operator._target_ == "cakes.ops.Derived" and cfg.get("arch") is None):
        # any arch option composes: the probe is only for the backbone
        probe = compose_config(config, [*overrides, "arch=ssv1_cakes123d_p"]) if cfg is None else cfg
        arch = uniform_arch(probe.backbone)
        (cakes_root / "found" / "arch").mkdir(parents=True, exist_ok=True)
        (cakes_root / "found" / "arch" / "cfgtest.yaml").write_text(yaml.safe_dump(arch))
        cfg = compose_config(config, [*overrides, "arch=cfgtest"])
    cfg.paths.output_dir = str(cakes_root / "run")
    OmegaConf.resolve(cfg)  # every interpolation resolves

    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.net.num_classes == cfg.model.net.num_classes
    if is_search(experiment):
        assert getattr(get_class(cfg.operator._target_), "search_mode", None) in ("cost", "performance")
        assert {"supernet", "prune"} <= set(cfg.callbacks)
    data = instantiate(cfg.data)
    assert data.batch_size == cfg.data.batch_size
    callbacks = instantiate_dict(cfg.callbacks)
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "ResumeStateCallback"}


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_multinode", "ddp_cpu"])
def test_trainer_configs(trainer: str, cakes_root: Path):
    cfg = compose_config("train", [f"trainer={trainer}"])
    expected = {
        "cpu": (1, 1, "auto"),
        "gpu": (1, 1, "auto"),
        "ddp": (8, 1, "ddp"),
        "ddp_multinode": (8, 2, "ddp"),
        "ddp_cpu": (2, 1, "ddp_spawn"),
    }[trainer]
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == expected
    assert cfg.trainer.sync_batchnorm is (cfg.trainer.accelerator == "gpu" and cfg.trainer.devices > 1)
    if cfg.trainer.accelerator == "cpu":
        cfg.paths.output_dir = str(cakes_root / "run")
        built = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert built.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_logger_configs(logger: str, cakes_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={logger}"])
    cfg.paths.output_dir = str(cakes_root / "run")
    (built,) = instantiate_dict(cfg.logger)
    assert Path(built.save_dir) == cakes_root / "run"


def test_default_logger_is_csv():
    assert list(compose_config("train", []).logger) == ["csv"]


# --------------------------------------------------------------------------- arch files are data
GOOD_LAYER = {"3x3x3": 8, "1x3x3": 4, "3x1x1": 4}


def write_arch(root: Path, name: str, text: str) -> None:
    (root / "found" / "arch").mkdir(parents=True, exist_ok=True)
    (root / "found" / "arch" / f"{name}.yaml").write_text(text)


def tiny_arch(**changes) -> dict:
    cfg = compose_config("train", ["experiment=demo_cakes", "arch=ssv1_cakes123d_p"])
    arch = uniform_arch(cfg.backbone)
    arch.update(changes)
    return arch


@pytest.mark.parametrize(
    "arch, message",
    [
        (lambda a: {**a, "_target_": "os.system"}, "key '_target_' is not allowed in an arch file"),
        (
            lambda a: {**a, "layers": {**a["layers"], "layer1.0": {"_target_": "os.system", "command": "true"}}},
            "key '_target_' is not allowed in an arch file",
        ),
        (
            lambda a: {**a, "layers": {**a["layers"], "layer1.0": {"_recursive_": True, **GOOD_LAYER}}},
            "key '_recursive_' is not allowed",
        ),
        (lambda a: {**a, "trainer": {"max_epochs": 1}}, r"unknown keys \['trainer'\]"),
        # arch files are never composed by Hydra: a defaults list is just an unknown key
        (lambda a: {**a, "defaults": ["/trainer/gpu"]}, r"unknown keys \['defaults'\]"),
    ],
)
def test_arch_yaml_cannot_inject_into_instantiation(cakes_root: Path, arch, message):
    from cakes.ops.arch import ArchError
    from cakes.run import run

    write_arch(cakes_root, "evil", yaml.safe_dump(arch(tiny_arch())))
    cfg = compose_config("train", ["experiment=demo_cakes", "arch=evil"])
    cfg.paths.output_dir = str(cakes_root / "run")
    with pytest.raises(ArchError, match=message):
        run(cfg)
    assert not (cakes_root / "run").exists()  # refused before anything was instantiated or written


@pytest.fixture(scope="module")
def train_py_with_evil_archs(tmp_path_factory) -> dict:
    """``python train.py ... arch=<evil>`` (the real Hydra path), for a ``_target_`` inside the layers
    and for an arch file that uses Hydra's ``@package _global_`` directive to inject config."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("evil")
    arch = tiny_arch()
    arch["layers"]["layer2.1"] = {"_target_": "builtins.open", "_args_": [str(root / "pwned_target"), "w"]}
    write_arch(root, "evil_target", yaml.safe_dump(arch))
    package = (
        f"# @package _global_\ndata:\n  batch_size: 999\nhydra:\n  callbacks:\n    evil:\n"
        f"      _target_: builtins.open\n      _args_: ['{root / 'pwned_hydra_callback'}', 'w']\n"
        + yaml.safe_dump({"arch": tiny_arch()})
    )
    write_arch(root, "evil_package", package)
    env = {**os.environ, "CAKES_ROOT": str(root), "WANDB_MODE": "offline"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "train.py", "experiment=demo_cakes", f"arch={name}", f"hydra.run.dir={root / name}"],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("evil_target", "evil_package")
    }
    results = {name: (proc.wait(timeout=300), proc.stdout.read()) for name, proc in procs.items()}
    return {"root": root, **results}


def test_train_py_refuses_an_arch_with_target(train_py_with_evil_archs):
    code, output = train_py_with_evil_archs["evil_target"]
    assert code != 0 and "layer2.1" in output and "is not allowed in an arch file" in output
    assert not (train_py_with_evil_archs["root"] / "pwned_target").exists()
    assert not (train_py_with_evil_archs["root"] / "evil_target" / "checkpoints").exists()


def test_train_py_reads_a_package_directive_as_plain_data_and_refuses_it(train_py_with_evil_archs):
    code, output = train_py_with_evil_archs["evil_package"]
    assert code != 0 and "'_target_' is not allowed in an arch file" in output  # hydra.callbacks.evil._target_
    assert not (train_py_with_evil_archs["root"] / "evil_package" / "checkpoints").exists()


def test_an_arch_file_cannot_run_code_through_hydra(train_py_with_evil_archs):
    assert not (train_py_with_evil_archs["root"] / "pwned_hydra_callback").exists()
