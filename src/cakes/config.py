"""Config access shared by the entry points: the OmegaConf resolvers the configs use, composing
without a run (for ``python -m cakes.profile``; ``conf/`` is found by :func:`cakes.utils.conf_dir`),
and facts derived from a composed config."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cakes.utils import conf_dir


def operator_mode(target: str) -> str:
    """``${operator_mode:${operator._target_}}`` → ``cost`` | ``performance`` | ``fixed`` (for run names)."""
    from hydra.utils import get_class

    return getattr(get_class(target), "search_mode", None) or "fixed"


def escape_interpolations(value: Any) -> Any:
    """Plain data whose strings OmegaConf keeps literal: every ``${`` escaped (``\\${``, and the
    backslashes before it doubled), so ``${oc.env:HOME}`` in an arch file stays that text — arch
    files are data, nothing in them is interpolated."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_interpolations(v) for v in value]
    return value


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (idempotent). Called by the entry points
    (``train.py``, ``search.py``, :func:`compose_config`, the tests' ``pytest_configure``), never as
    a side effect of ``import cakes``."""
    if not OmegaConf.has_resolver("operator_mode"):
        OmegaConf.register_new_resolver("operator_mode", operator_mode)
    if not OmegaConf.has_resolver("arch_data"):
        from cakes.arch import arch_data

        # a DictConfig (not a dict) so that OmegaConf.resolve() can store it in place; its strings escaped,
        # or OmegaConf would resolve a ${...} written in the arch file
        OmegaConf.register_new_resolver(
            "arch_data", lambda name, arch_dir: OmegaConf.create(escape_interpolations(arch_data(name, arch_dir)))
        )


def compose_config(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with command-line style overrides, outside a Hydra run.

    ``paths.output_dir`` (a Hydra run-time value) is set to a placeholder so the tree resolves.
    The resolvers the configs use are registered first (:func:`register_resolvers`).
    """
    register_resolvers()
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = "<no run directory>"
    return cfg


def one_line(err: BaseException) -> str:
    """An error as one line for a command-line tool: the message of the innermost cause that
    carries one (Hydra and OmegaConf wrap ours), whitespace collapsed."""
    inner = err
    while (
        type(inner).__name__ in ("InterpolationResolutionError", "InstantiationException")
        and inner.__cause__ is not None
        and str(inner.__cause__).strip()
    ):
        inner = inner.__cause__
    text = " ".join(str(inner).split()) or type(inner).__name__
    return text if isinstance(inner, (ValueError, OSError)) else f"{type(inner).__name__}: {text}"


def compose_train_config(overrides: Sequence[str] = ()) -> DictConfig:
    return compose_config("train", overrides)


def input_shape_from_config(cfg: DictConfig) -> tuple[int, ...]:
    """One view's input, batch axis included: ``(1, *model.input_shape)``."""
    return (1, *(int(s) for s in cfg.model.input_shape))


def views_from_config(cfg: DictConfig) -> int:
    """Views per test sample (temporal clips × spatial crops for video; 1 otherwise)."""
    data = cfg.get("data") or {}
    return int(data.get("test_clips", 1)) * int(data.get("test_crops", 1))
