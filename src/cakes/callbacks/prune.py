"""``CakesPruneCallback``: turns a trained supernet into a found architecture (arch yaml + plot).

The yaml lands in ``<arch_dir>/arch/<name>.yaml`` (the default name ends in ``_seed<seed>``, so the
jobs of a multi-seed sweep never share one); the retrain command printed and saved in
``retrain_command.txt`` names it by absolute path, ``python train.py experiment=<recipe>
arch=/abs/.../<name>.yaml``, so it retrains exactly this file whatever ``paths.arch_dir`` the retrain
uses. An export never replaces another run's file: it is created exclusively (a concurrent job that
took the name first makes it move on to ``<name>_1.yaml``, ...).
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cakes.ops.arch import Arch, save_arch
from cakes.utils import plain
from cakes.figures import save_figure
from cakes.ops.search import SELECTION_RULES, search_slots

log = logging.getLogger(__name__)


def found_arch(net: torch.nn.Module, rule: str = "auto", meta: dict[str, Any] | None = None) -> Arch:
    """Per-layer counts of every supernet slot of ``net`` under selection ``rule`` (``auto``: each
    slot's own rule — the one a performance-priority slot evaluates with)."""
    slots = search_slots(net)
    if not slots:
        raise ValueError("found_arch: the network has no search-time slots")
    op_sets = {s.op_set.name for s in slots}
    if len(op_sets) != 1:
        raise ValueError(f"found_arch: slots use several op sets {sorted(op_sets)}")
    op_set = slots[0].op_set
    return Arch(
        backbone=getattr(net, "name", type(net).__name__),
        op_set=op_set.name if not op_set.name.startswith("custom:") else list(op_set.names),
        layers={s.layer: s.counts(None if rule == "auto" else rule) for s in slots},
        meta=dict(meta or {}),
    )


def plot_arch(arch: Arch, path: Path, title: str = "") -> Path:
    """Per-layer stacked bars of the sub-kernel mix (fraction of each layer's channels), as in the
    paper's architecture figures. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arch.layers)
    subkernels: list[str] = []
    for counts in arch.layers.values():
        subkernels += [k for k in counts if k not in subkernels]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 3.6))
    bottom = [0.0] * len(names)
    for sub in subkernels:
        frac = [arch.layers[n].get(sub, 0) / max(1, sum(arch.layers[n].values())) for n in names]
        ax.bar(range(len(names)), frac, bottom=bottom, label=sub, width=0.8)
        bottom = [b + f for b, f in zip(bottom, frac, strict=True)]
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fraction of channels")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


class CakesPruneCallback(pl.Callback):
    """Exports the found architecture at the end of the search (and every ``every_n_epochs``).

    Args:
        name: file name (without ``.yaml``) of the export; made unique if a different run already
            wrote that name (``_1``, ``_2``, ...), never overwriting another run's result (the file is
            created exclusively, so this holds for jobs started at the same time too).
        arch_dir: directory on Hydra's search path; the yaml goes to ``<arch_dir>/arch/<name>.yaml``.
        selection: ``layer_topk`` (the authors' code), ``channel_argmax`` (the paper's wording) or
            ``auto`` (each slot's own rule: ``layer_topk`` for cost-priority slots, the rule a
            performance-priority slot evaluates with for its sampling).
        every_n_epochs: also export every N epochs (0: only at the end).
        provenance: recorded under ``meta`` (op set, mode, lasso, cost weights, data, ...).
        retrain: command prefix printed with ``arch=<absolute path of the export>`` appended.
    """

    def __init__(
        self,
        name: str,
        arch_dir: str,
        selection: str = "auto",
        every_n_epochs: int = 0,
        provenance: dict[str, Any] | None = None,
        retrain: str = "python train.py operator=cakes",
        plot: bool = True,
    ) -> None:
        if selection not in (*SELECTION_RULES, "auto"):
            raise ValueError(f"selection must be one of {SELECTION_RULES} or 'auto', got {selection!r}")
        self.name, self.arch_dir = name, Path(os.path.abspath(Path(arch_dir).expanduser()))
        self.selection, self.every_n_epochs = selection, int(every_n_epochs)
        self.provenance = dict(plain(provenance) or {})  # Hydra passes DictConfig/ListConfig values
        self.retrain, self.plot = retrain, plot
        self.export_path: Path | None = None
        self.retrain_command: str | None = None

    # --- where ---------------------------------------------------------------------------------
    def command_for(self, path: Path) -> str:
        """The retrain command of the export at ``path`` (named by absolute path: ``arch=<name>``
        would resolve against the retrain's own ``paths.arch_dir`` and could find another file)."""
        return f"{self.retrain} arch={shlex.quote(str(Path(path).absolute()))}"

    @staticmethod
    def _owned_by(path: Path, run_id: str) -> bool:
        from cakes.ops.arch import load_arch

        try:
            return load_arch(path).meta.get("run_dir") == run_id
        except (ValueError, OSError):
            return False

    def _write(self, arch: Arch, run_id: str) -> Path:
        """Write the export: over this run's own earlier export (``every_n_epochs``, a resumed run),
        else exclusively to the first free ``<name>[_i].yaml`` — never over another run's file."""

        def header(path: Path) -> str:
            return f"Found by a CAKES search in {run_id}\nRetrain: {self.command_for(path)}"

        own = self.export_path
        if own is not None and self._owned_by(own, run_id):
            return save_arch(arch, own, header=header(own))
        folder, i = self.arch_dir / "arch", 0
        while True:
            path = folder / (f"{self.name}.yaml" if i == 0 else f"{self.name}_{i}.yaml")  # names may hold dots
            if self._owned_by(path, run_id):  # a resumed run: its own export
                return save_arch(arch, path, header=header(path))
            try:
                return save_arch(arch, path, header=header(path), exclusive=True)
            except FileExistsError:
                if self._owned_by(path, run_id):
                    return save_arch(arch, path, header=header(path))
                log.warning("%s already holds another run's architecture: not overwritten, trying the next name", path)
            i += 1

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last_epoch = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not last_epoch:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        if not trainer.is_global_zero:
            return None
        from cakes.utils import git_commit

        run_dir = str(Path(trainer.default_root_dir).resolve())
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        net = pl_module.net
        rules = {s.selection if self.selection == "auto" else self.selection for s in search_slots(net)}
        meta = {
            **self.provenance,
            "selection": ",".join(sorted(rules)),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "git_commit": git_commit(),
            "run_dir": run_dir,
            "source_checkpoint": ckpt or None,
        }
        for attr in ("depth", "width"):
            if hasattr(net, attr):
                meta[attr] = getattr(net, attr)
        arch = found_arch(net, self.selection, meta)
        cost = self.costs(pl_module, arch)
        arch.meta.update(cost)
        self.export_path = self._write(arch, run_dir)
        self.retrain_command = self.command_for(self.export_path)
        header = f"Found by a CAKES search in {run_dir}\nRetrain: {self.retrain_command}"
        save_arch(arch, Path(run_dir) / "arch" / self.export_path.name, header=header)
        log.info(
            "found architecture written to %s (%s)", self.export_path, ", ".join(f"{k}={v}" for k, v in cost.items())
        )
        plot_path = None
        if self.plot:
            plot_path = plot_arch(
                arch,
                Path(run_dir) / "arch" / f"{self.export_path.stem}.png",
                title=f"{self.export_path.stem} ({meta['selection']})",
            )
        for logger in trainer.loggers:
            logger.log_metrics({f"found/{k}": float(v) for k, v in cost.items()}, step=trainer.global_step)
            if hasattr(logger, "log_image") and plot_path is not None:
                logger.log_image(key="found/arch", images=[str(plot_path)])
            if type(logger).__name__ == "WandbLogger":
                import wandb

                artifact = wandb.Artifact(self.export_path.stem, type="cakes-arch", metadata=cost)
                artifact.add_file(str(self.export_path))
                logger.experiment.log_artifact(artifact)
        return self.export_path

    @staticmethod
    def costs(pl_module: pl.LightningModule, arch: Arch) -> dict[str, float]:
        """Params and MACs (one view) of the found network and of the all-3D baseline."""
        from cakes.builders import build_network
        from cakes.profile import profile

        shape = getattr(pl_module.hparams, "input_shape", None)
        net_cfg = dict(pl_module.hparams.net)
        result: dict[str, float] = {}
        variants = {
            "found": {"_target_": "cakes.ops.Derived", "_recursive_": False, "arch": arch.to_dict()},
            "c3d": {"_target_": "cakes.ops.Homogeneous", "kind": "c3d"},
        }
        for label, operator in variants.items():
            with torch.device("meta"):
                net = build_network({**net_cfg, "operator": operator}, pretrained=False)
            if shape:
                prof = profile(net, (1, *shape))
                result[f"{label}_params"], result[f"{label}_gmacs"] = prof.params, round(prof.macs / 1e9, 4)
            else:
                result[f"{label}_params"] = sum(p.numel() for p in net.parameters())
        return result
