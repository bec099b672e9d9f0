"""Check a dataset completely before (or instead of) training on it.

    python -m cakes.check_data <the same overrides as train.py / search.py> [--workers N]
    python -m cakes.check_data experiment=ssv1_c3d data.root=/datasets/ssv1
    python -m cakes.check_data experiment=msd_base data.root=/datasets/Task07_Pancreas

Composes the config (``train.yaml``; ``--config search`` for search recipes), instantiates the data
module, and has it check every item it lists (its ``check_items``; synthetic sets are generated first):

* video (Something-Something): labels file, class count against ``num_classes``, list / CSV / json
  format, label range; every listed frame folder exists, its frames are numbered without gaps
  (and as many as a TRN list says) and **every jpg decodes**, all of one size; v2 videos open and
  every frame decodes.
* volumes (MSD, NIH): the file list; every image and label file exists and reads completely
  (NIfTI, or a DICOM series); image and label agree in shape and affine; label values are
  integers in ``0..num_classes-1``; the split.

Prints a report with counts and every bad item by name; exits 1 if anything is bad (2 if the
config itself cannot be used). Nothing is written.

During training, ``data.bad_sample=skip`` drops unreadable videos instead of failing: each one is
named in a ``BadSampleWarning``, counted, logged (``train/skipped_samples``) and printed per epoch by
:class:`cakes.callbacks.bad_samples.BadSampleReport`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch

from cakes.datamodules.checks import Section


@dataclass
class Report:
    """What ``python -m cakes.check_data`` prints: the data module's sections and a verdict."""

    dataset: str
    sections: list[Section] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(len(s.bad) for s in self.sections)

    def format(self) -> str:
        lines = [f"check_data: {self.dataset}"]
        for s in self.sections:
            units = "".join(f", {n} {unit}" for unit, n in s.units.items())
            lines.append(f"  {s.name}: {s.items} checked{units}, {len(s.bad)} bad")
            lines += [f"    BAD {s.name} {item}: {reason}" for item, reason in s.bad]
        verdict = "OK" if self.num_bad == 0 else f"FAILED: {self.num_bad} bad item(s)"
        lines.append(f"result: {verdict}")
        return "\n".join(lines)


def check_datamodule(dm: pl.LightningDataModule, workers: int = 1) -> Report:
    """Check every item of a data module with its ``check_items(workers)`` (see the module docstring)."""
    check_items = getattr(dm, "check_items", None)
    if check_items is None:
        raise TypeError(f"check_data does not know {type(dm).__name__}")
    return Report(f"{type(dm).__name__} at {getattr(dm, 'root', '?')}", check_items(workers))


def compose_data_config(overrides: Sequence[str], config: str | None = None) -> Any:
    """The run's config as ``train.py`` (or ``search.py``) would compose it, writing nothing."""
    from cakes.config import compose_config

    errors: list[Exception] = []
    for name in [config] if config else ["train", "search"]:
        try:
            cfg = compose_config(name, overrides)
            break
        except Exception as err:  # noqa: BLE001 - try the other entry point's config
            errors.append(err)
    else:
        raise errors[0]  # train.yaml's reason (or the one asked for)
    if "split_dir" in cfg.data:
        cfg.data.split_dir = None  # a check writes nothing
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cakes.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py / search.py")
    parser.add_argument(
        "--config",
        choices=["train", "search"],
        default=None,
        help="config to compose (default: train.yaml, else search.yaml)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes decoding in parallel (default: min(8, CPUs))",
    )
    args = parser.parse_intermixed_args(argv)
    from hydra.utils import instantiate

    from cakes.config import one_line
    from cakes.arch import check_arch

    try:
        cfg = compose_data_config(args.overrides, args.config)
        check_arch(cfg)  # as train.py would, before anything is built
        dm = instantiate(cfg.data)
    except Exception as err:  # noqa: BLE001 - a config that cannot be used is its own exit status
        print(f"check_data: cannot build the data module: {one_line(err)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        report = check_datamodule(dm, workers=args.workers)
    except Exception as err:  # noqa: BLE001 - one line, no traceback
        print(f"check_data: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(report.format(), flush=True)
    return 1 if report.num_bad else 0


if __name__ == "__main__":
    sys.exit(main())
