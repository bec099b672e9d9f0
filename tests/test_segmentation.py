"""Segmentation module: DSC convention, sliding window, and end-to-end runs through cakes.run on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from cakes.ops.arch import load_arch
from cakes.backbones import C2FNAS
from cakes.config import compose_config
from cakes.modules import VolumeSegmentationModule
from cakes.modules.segmentation import region_dice, summarize_dice
from cakes.run import run

REGIONS = {"pancreas": [1, 2], "tumour": [2]}
# CPU-sized overrides of the demo recipes: small synthetic set, 2 mm, 32³ patches, 1/8 width, a couple of steps
FAST = [
    "backbone.width=0.125",
    "data.num_cases=6",
    "data.shape=[40,40,16]",
    "data.spacing=[2.0,2.0,2.0]",
    "data.val_fraction=0.34",
    "data.batch_size=2",
    "data.crops_per_volume=2",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "+trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "model.evaluation.overlap=0.25",
]


def test_dice_perfect_empty_and_tumour_free_rule():
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    label[2:6, 2:6, 2:6] = 1
    label[3:5, 3:5, 3:5] = 2
    dsc, empty = region_dice(label, label, REGIONS)
    assert dsc.tolist() == [1.0, 1.0] and not empty.any()
    dsc, empty = region_dice(torch.zeros_like(label), label, REGIONS)
    assert dsc.tolist() == [0.0, 0.0] and empty.all()
    half = label.clone()
    half[2:4] = 0
    assert region_dice(half, label, {"pancreas": [1, 2]})[0].item() == pytest.approx(2 * 32 / (32 + 64))

    tumour_free = label.clone()
    tumour_free[tumour_free == 2] = 1
    dsc_free, empty_free = region_dice(tumour_free, tumour_free, REGIONS)  # tumour: no reference voxel
    assert dsc_free[0] == 1.0 and torch.isnan(dsc_free[1]) and empty_free[1]
    wrong = tumour_free.clone()
    wrong[0, 0, 0] = 2  # a false-positive tumour voxel on a tumour-free case
    dsc_wrong, empty_wrong = region_dice(wrong, tumour_free, REGIONS)
    cases = torch.stack([dsc, dsc_free, dsc_wrong]), torch.stack([empty, empty_free, empty_wrong])
    metrics = summarize_dice(*cases, list(REGIONS), "val", mean_of=list(REGIONS))
    assert metrics["val/dsc_tumour"] == 0.0  # only the case with a tumour counts
    assert metrics["val/tumour_empty_cases"] == 2 and metrics["val/tumour_empty_correct"] == 0.5
    assert metrics["val/pancreas_empty_cases"] == 0 and "val/pancreas_empty_correct" not in metrics
    assert metrics["val/dsc_pancreas_min"] == 0.0 and metrics["val/dsc_pancreas_max"] == 1.0
    assert metrics["val/dsc_mean"] == pytest.approx((metrics["val/dsc_pancreas"] + 0.0) / 2)


class Constant(nn.Module):
    """A stand-in network: logits 1 everywhere (so the stitched map shows the window coverage)."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], self.num_classes, *x.shape[2:])


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_covers_the_whole_volume(mode):
    net = {
        "_target_": "cakes.backbones.C2FNAS",
        "width": 0.125,
        "num_classes": 3,
        "operator": {"_target_": "cakes.ops.Homogeneous", "kind": "c3d"},
    }
    module = VolumeSegmentationModule(
        net,
        {"lr": 0.01, "weight_decay": 0.0},
        {},
        input_shape=[1, 32, 32, 32],
        evaluation={"regions": REGIONS, "mode": mode, "overlap": 0.25},
    )
    volume = torch.randn(1, 1, 45, 33, 70)  # no side a multiple of the window
    with torch.no_grad():
        logits = module.predict_volume(volume)
    assert logits.shape == (1, 3, 45, 33, 70) and torch.isfinite(logits).all()
    module.net = Constant()
    assert torch.allclose(module.predict_volume(volume), torch.ones(1, 3, 45, 33, 70))
    with pytest.raises(ValueError, match="evaluation.regions must map names to labels in 1..2"):
        VolumeSegmentationModule(net, {}, {}, input_shape=[1, 32, 32, 32], evaluation={"regions": {"x": [3]}})


def fast_config(config: str, root: Path, run_dir: str, overrides: list[str]):
    cfg = compose_config(config, [*FAST, f"paths.root_dir={root}", *overrides])
    cfg.paths.output_dir = str(root / "runs" / run_dir)
    return cfg


@pytest.fixture()
def cakes_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_train_validate_test_loop_writes_results(cakes_root: Path):
    cfg = fast_config(
        "train",
        cakes_root,
        "train",
        ["experiment=demo_msd_c3d", "data.eval_space=original", "model.evaluation.save_predictions=true"],
    )
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    for key in ("train/loss_epoch", "val/dsc_pancreas", "val/dsc_mean", "test/dsc_pancreas", "test/dsc_label2"):
        assert key in metrics and np.isfinite(metrics[key]), key
    split = json.loads((out / "split.json").read_text())
    assert len(split["val"]) == 2 and metrics["test/cases"] == 2
    report = json.loads((out / "eval_test.json").read_text())
    assert report["protocol"]["spacing_mm"] == [2.0, 2.0, 2.0] and report["protocol"]["blending"] == "gaussian"
    assert report["protocol"]["eval_space"] == "original" and report["protocol"]["window_hu"] == [-100.0, 240.0]
    assert sorted(report["cases"]) == split["val"]
    for case in split["val"]:  # predictions on the stored grid, with the stored affine
        pred = nib.load(out / "predictions" / f"{case}.nii.gz")
        image = nib.load(cakes_root / "data" / "synthetic_msd" / "imagesTr" / f"{case}.nii.gz")
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-4)
    assert list((out / "checkpoints").glob("step*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode", ["operator=cost_priority", "operator=performance_priority search.lasso=0"], ids=["cost", "performance"]
)
def test_search_exports_arch_and_retrain_reads_it(cakes_root: Path, mode: str):
    search = fast_config("search", cakes_root, "search", ["experiment=demo_msd_search", *mode.split()])
    run(search)
    name = search.search.name
    arch = load_arch(cakes_root / "found" / "arch" / f"{name}.yaml")
    assert arch.backbone == "c2fnas" and arch.op_set == "v123d" and list(arch.layers) == list(C2FNAS.slots(width=0.125))
    assert arch.meta["found_params"] <= arch.meta["c3d_params"]
    retrain = fast_config("train", cakes_root, "retrain", ["experiment=demo_msd_cakes", f"arch={name}", "test=false"])
    metrics = run(retrain)
    assert np.isfinite(metrics["val/dsc_pancreas"])
    ckpt = torch.load(next((Path(retrain.paths.output_dir) / "checkpoints").glob("last.ckpt")), weights_only=False)
    assert ckpt["cakes"]["backbone"] == "c2fnas" and ckpt["hyper_parameters"]["net"]["operator"]["arch"]["layers"]


@pytest.mark.parametrize(
    "overrides",
    [
        "experiment=msd_uniform operator.op_set=v2d",
        "experiment=msd_search",
        "experiment=msd_search operator=performance_priority search.lasso=0",
        "experiment=nih_c2fnas_3d data.fold=2",
        "experiment=msd_c2fnas_panc",
        "experiment=demo_msd_c3d",
    ],
)
def test_volumetric_recipes_compose_and_instantiate(overrides: str):
    from hydra.utils import instantiate

    cfg = compose_config("search" if "search" in overrides else "train", overrides.split())
    cfg.paths.output_dir = "/nonexistent/run"
    data = instantiate(cfg.data)
    assert data.num_classes == cfg.model.net.num_classes and data.batch_size % data.crops_per_volume == 0
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.roi_size == tuple(cfg.data.patch_size) and model.net.name == "c2fnas"
    assert cfg.callbacks.model_checkpoint.monitor == "val/dsc_mean"
    if "nih" in overrides:
        assert data.fold == 2 and list(model.regions) == ["pancreas"] and cfg.task_name == "nih_c2fnas_3d_fold2"
    else:
        assert list(model.regions) == ["pancreas", "tumour", "label1", "label2"]
