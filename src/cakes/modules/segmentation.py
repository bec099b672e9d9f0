"""3D segmentation (MSD pancreas, NIH Pancreas-CT): Dice + cross-entropy on random patches,
sliding-window evaluation of whole volumes, per-region DSC counted once per case.

DSC convention (logged with every result as part of the evaluation protocol):

* **regions** (default, from the data config): each named region is a set of labels scored as one
  foreground, e.g. MSD ``pancreas = labels 1 ∪ 2`` (whole organ incl. tumour), ``tumour = label 2``.
  With ``per_label``, every label value ``k ≥ 1`` is also scored alone as ``label<k>`` (the MSD
  challenge's per-label variant).
* DSC = 2|P∩G| / (|P| + |G|) per case and region on the label map argmax(softmax). A case whose
  reference has no voxel of a region (e.g. a tumour-free case) has no DSC for it: it is excluded
  from that region's mean/std/max/min and counted in ``<stage>/<region>_empty_cases``, with
  ``<stage>/<region>_empty_correct`` the fraction of those cases predicted empty as well.
* ``<stage>/dsc_mean`` is the mean over the regions (not the per-label entries) of their mean DSC
  (the papers' "average DSC"); it is the checkpoint monitor of the recipes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import ResampleToMatch

from cakes.utils import plain
from cakes.modules.base import CakesModule, first_occurrence
from cakes.modules.schedules import Poly

log = logging.getLogger(__name__)

BLEND_MODES = ("gaussian", "constant")
DEFAULT_EVALUATION: dict[str, Any] = {
    "regions": {"foreground": [1]},
    "per_label": False,
    "roi_size": None,  # null: the training patch (input_shape[1:])
    "sw_batch_size": 2,
    "overlap": 0.5,
    "mode": "gaussian",
    "stitch_device": "cpu",  # cpu | null (the model's device)
    "save_predictions": False,  # test stage: <run dir>/predictions/<case>.nii.gz
}


def region_dice(
    pred: torch.Tensor, label: torch.Tensor, regions: Mapping[str, Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """DSC per region of one case: ``pred``, ``label`` integer label maps of one shape.

    Returns ``(dsc, pred_empty)``, each ``(R,)``: dsc float64 (NaN where the reference region is
    empty), pred_empty bool (the prediction has no voxel of the region).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    dsc, empty = [], []
    for labels in regions.values():
        values = torch.as_tensor(list(labels), device=pred.device)
        p, g = torch.isin(pred, values), torch.isin(label.to(pred.device), values)
        p_sum, g_sum = int(p.sum()), int(g.sum())
        dsc.append(2.0 * int((p & g).sum()) / (p_sum + g_sum) if g_sum else float("nan"))
        empty.append(p_sum == 0)
    return torch.tensor(dsc, dtype=torch.float64), torch.tensor(empty)


def summarize_dice(
    dsc: torch.Tensor, pred_empty: torch.Tensor, names: Sequence[str], stage: str, mean_of: Sequence[str]
) -> dict[str, float]:
    """Per-region mean/std/max/min over cases with a non-empty reference, the empty-reference
    counts, and ``<stage>/dsc_mean`` over the regions ``mean_of``; ``dsc``, ``pred_empty`` ``(N, R)``."""
    metrics: dict[str, float] = {f"{stage}/cases": float(dsc.shape[0])}
    means = {}
    for r, name in enumerate(names):
        values = dsc[:, r][~torch.isnan(dsc[:, r])]
        empty = torch.isnan(dsc[:, r])
        metrics[f"{stage}/{name}_empty_cases"] = float(empty.sum())
        if empty.any():
            metrics[f"{stage}/{name}_empty_correct"] = float(pred_empty[empty, r].double().mean())
        if values.numel():
            means[name] = float(values.mean())
            metrics[f"{stage}/dsc_{name}"] = means[name]
            metrics[f"{stage}/dsc_{name}_std"] = float(values.std(unbiased=False))
            metrics[f"{stage}/dsc_{name}_max"] = float(values.max())
            metrics[f"{stage}/dsc_{name}_min"] = float(values.min())
    averaged = [means[n] for n in mean_of if n in means]
    if averaged:
        metrics[f"{stage}/dsc_mean"] = sum(averaged) / len(averaged)
    return metrics


class VolumeSegmentationModule(CakesModule):
    """Patches ``(B, 1, D, H, W)`` → logits ``(B, K, D, H, W)``; whole-volume sliding-window evaluation.

    Args (beyond :class:`~cakes.modules.base.CakesModule`):
        loss: ``{lambda_dice, lambda_ce}`` weights of MONAI's DiceCELoss (softmax, one-hot labels).
        evaluation: ``regions`` ({name: labels}), ``per_label``, ``roi_size`` (null = the training
            patch), ``sw_batch_size``, ``overlap``, ``mode`` (gaussian | constant blending),
            ``stitch_device`` (cpu | null), ``save_predictions`` (test stage, NIfTI).

    Scheduler settings: ``power`` of the poly decay over ``trainer.max_steps`` iterations (or the
    estimated total when only ``max_epochs`` is set).
    """

    #: the training patch is the network's input (``model.input_shape`` is built from it)
    input_source = "data.patch_size"

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        base_batch_size: int = 8,
        input_shape: list[int] | None = None,
        channels_last: bool = True,
        loss: Mapping[str, float] | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler, base_batch_size, input_shape, channels_last)
        loss = {"lambda_dice": 1.0, "lambda_ce": 1.0, **plain(loss or {})}
        evaluation = {**DEFAULT_EVALUATION, **plain(evaluation or {})}
        unknown = set(evaluation) - set(DEFAULT_EVALUATION)
        if unknown:
            raise ValueError(f"evaluation: unknown settings {sorted(unknown)}; known: {sorted(DEFAULT_EVALUATION)}")
        evaluation["regions"] = {str(k): [int(v) for v in labels] for k, labels in evaluation["regions"].items()}
        self.save_hyperparameters({"loss": loss, "evaluation": evaluation})
        self.num_classes = int(self.net.num_classes)
        bad = {k: v for k, v in evaluation["regions"].items() if not v or any(not 0 < x < self.num_classes for x in v)}
        if not evaluation["regions"] or bad:
            raise ValueError(
                f"evaluation.regions must map names to labels in 1..{self.num_classes - 1}, got {evaluation['regions']}"
            )
        if evaluation["mode"] not in BLEND_MODES:
            raise ValueError(f"evaluation.mode must be one of {BLEND_MODES}, got {evaluation['mode']!r}")
        if not 0 <= float(evaluation["overlap"]) < 1 or int(evaluation["sw_batch_size"]) < 1:
            raise ValueError(
                f"evaluation: need 0 <= overlap < 1 and sw_batch_size >= 1, got {evaluation['overlap']}, "
                f"{evaluation['sw_batch_size']}"
            )
        if evaluation["stitch_device"] not in (None, "cpu"):
            raise ValueError(f"evaluation.stitch_device must be 'cpu' or null, got {evaluation['stitch_device']!r}")
        roi = evaluation["roi_size"] or (list(input_shape)[1:] if input_shape else None)
        if roi is None or len(roi) != 3:
            raise ValueError("evaluation.roi_size (3 sizes) is needed when input_shape is not given")
        self.roi_size = tuple(int(s) for s in roi)
        self.regions = dict(evaluation["regions"])
        if evaluation["per_label"]:
            self.regions.update({f"label{k}": [k] for k in range(1, self.num_classes)})
        self.loss = DiceCELoss(
            to_onehot_y=True, softmax=True, lambda_dice=float(loss["lambda_dice"]), lambda_ce=float(loss["lambda_ce"])
        )
        self._eval_outputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, D, H, W) -> (B, K, D, H, W)`` logits."""
        return self.net(image.as_tensor() if isinstance(image, MetaTensor) else image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(logits))
        return loss

    # --- evaluation ----------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """The evaluation protocol: the data module's part (spacing, window, split, fold, space) and ours."""
        ev = self.hparams.evaluation
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = datamodule.protocol() if hasattr(datamodule, "protocol") else {}
        return {
            **data,
            "inference": "sliding window",
            "roi_size": list(self.roi_size),
            "overlap": float(ev["overlap"]),
            "blending": ev["mode"],
            "dsc_regions": dict(self.regions),
            "dsc_mean_of": list(ev["regions"]),
            "empty_reference_rule": "excluded from the region's DSC statistics; counted in <region>_empty_cases, "
            "<region>_empty_correct = fraction predicted empty",
        }

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits of whole volumes ``(B, 1, D, H, W) -> (B, K, D, H, W)`` (on the
        stitch device)."""
        ev = self.hparams.evaluation
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        return sliding_window_inference(
            image,
            self.roi_size,
            int(ev["sw_batch_size"]),
            self.net,
            overlap=float(ev["overlap"]),
            mode=ev["mode"],
            sw_device=self.device,
            device=ev["stitch_device"] or self.device,
        )

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if batch["image"].shape[0] != 1:
            raise ValueError(f"{stage} batches must hold one whole volume, got {batch['image'].shape[0]}")
        pred = self.predict_volume(batch["image"]).argmax(dim=1)  # (1, D, H, W)
        reference = batch.get("original_label", batch["label"])
        if "original_label" in batch:  # back to the stored grid, nearest neighbour
            on_grid = MetaTensor(pred.float(), affine=batch["image"].affine[0])
            pred = ResampleToMatch(mode="nearest")(on_grid, img_dst=reference[0]).as_tensor().round().long()
        ref = reference[0, 0]
        dsc, empty = region_dice(
            pred[0].cpu(), (ref.as_tensor() if isinstance(ref, MetaTensor) else ref).cpu(), self.regions
        )
        self._eval_outputs.append((int(batch["index"][0]), dsc, empty))
        if stage == "test" and self.hparams.evaluation["save_predictions"]:
            self._write_prediction(batch["case"][0], pred[0], reference.affine[0])

    def _write_prediction(self, case: str, pred: torch.Tensor, affine: torch.Tensor) -> None:
        """``<run dir>/predictions/<case>.nii.gz`` (uint8 labels, the reference's affine), atomically."""
        import nibabel as nib

        from cakes.files import atomic_output

        folder = Path(self.trainer.default_root_dir) / "predictions"
        with atomic_output(folder / f"{case}.nii.gz", suffix=".nii.gz") as tmp:  # nibabel compresses by the name
            nib.save(nib.Nifti1Image(pred.cpu().numpy().astype("uint8"), affine.cpu().double().numpy()), str(tmp))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        if not self._eval_outputs:
            return
        index = torch.tensor([o[0] for o in self._eval_outputs], device=self.device)
        dsc = torch.stack([o[1] for o in self._eval_outputs]).to(self.device)
        empty = torch.stack([o[2] for o in self._eval_outputs]).to(self.device, torch.uint8)
        self._eval_outputs.clear()
        if self.trainer.world_size > 1:  # every rank evaluated its cases (plus sampler padding)
            index, dsc, empty = (self.all_gather(t).flatten(0, 1) for t in (index, dsc, empty))
        keep = first_occurrence(index)
        index, dsc, empty = index[keep].cpu(), dsc[keep].cpu(), empty[keep].cpu().bool()
        names = list(self.regions)
        metrics = summarize_dice(dsc, empty, names, stage, mean_of=list(self.hparams.evaluation["regions"]))
        self.log_dict(metrics, prog_bar=False, sync_dist=False, rank_zero_only=True)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        protocol = self.protocol()
        log.info(
            "%s DSC over %d cases: %s\nprotocol: %s",
            stage,
            len(index),
            ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items()),
            json.dumps(protocol),
        )
        cases = self._case_ids(index.tolist())
        report = {
            "stage": stage,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "protocol": protocol,
            "metrics": metrics,
            "cases": {
                case: {n: (None if torch.isnan(d[r]) else float(d[r])) for r, n in enumerate(names)}
                for case, d in zip(cases, dsc, strict=True)
            },
        }
        from cakes.files import write_atomic

        write_atomic(Path(self.trainer.default_root_dir) / f"eval_{stage}.json", json.dumps(report, indent=2) + "\n")

    def _case_ids(self, indices: list[int]) -> list[str]:
        split = getattr(self.trainer.datamodule, "split", None) or {}
        ids = split.get("val")
        return [ids[i] if ids else str(i) for i in indices]

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer()
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        factor = Poly(max_steps=int(max_steps), power=float(self.hparams.scheduler.get("power", 0.9)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
