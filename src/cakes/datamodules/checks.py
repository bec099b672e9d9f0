"""What ``python -m cakes.check_data`` gets from a data module: named sections of checked items,
and a parallel map that runs the per-item checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One part of a data check (a split, the file list, ...): how many items, which are bad.

    Attributes:
        name: shown in the report (``"train"``, ``"file list"``, ...).
        items: number of items checked.
        units: further counts, e.g. ``{"frames decoded": 1234}``.
        bad: ``(item name, reason)`` for every bad item.
    """

    name: str
    items: int = 0
    units: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str]] = field(default_factory=list)


def map_items(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterable[Any]:
    """``function`` over ``items`` in order, in ``workers`` spawned processes when ``workers > 1``.

    ``function`` must be a module-level function (it is pickled for the worker processes).
    """
    if workers <= 1 or len(items) < 2:
        return map(function, items)
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        return list(pool.imap(function, items, chunksize=max(1, min(64, len(items) // (8 * workers)))))
    finally:
        pool.close()
        pool.join()
