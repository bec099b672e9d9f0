"""The benchmark scripts run end to end at toy sizes (their figures are measured, never asserted)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| shape")]


@pytest.mark.slow
def test_ops_benchmark_prints_both_layouts_and_the_naive_form(capsys):
    load("ops").main(["--only", "res5", "--splits", "thirds", "--reps", "1", "--warmup", "0", "--naive", "--batch", "1"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [r[1] for r in rows] == ["channels_last", "ncdhw"]
    for row in rows:
        dense, cakes, ratio, mac_ratio = (float(v) for v in row[3:7])
        rounding = 0.05 / dense * (1 + cakes / dense) + 5e-4  # ms printed to 0.1, ratio to 0.001
        assert dense > 0 and cakes > 0 and ratio == pytest.approx(cakes / dense, abs=rounding)
        assert mac_ratio == pytest.approx((170 * 27 + 171 * 9 + 171 * 3) / (512 * 27), abs=1e-3)
    assert len(re.findall(r"naive +[\d.]+ ms", out)) == 2


@pytest.mark.slow
def test_search_benchmark_pairs_supernet_steps_with_derived_networks(capsys):
    load("search").main(["--reps", "1", "--channels", "16", "--frames", "2", "--size", "8", "--op-sets", "c12d"])
    rows = table_rows(capsys.readouterr().out)
    names = [r[0] for r in rows]
    assert names == [
        "perf-priority slot c12d vs derived of the same draw",
        "perf-priority slot c12d vs derived with uniform counts",
        "cost-priority slot c12d vs its branches run separately",
        "perf-priority tiny ResNet-50 vs derived of the same draw",
        "perf-priority tiny ResNet-50 vs derived with uniform counts",
    ]
    for row in rows:
        mine, ref, ratio = (float(v) for v in row[1:4])
        rounding = 0.05 / ref * (1 + mine / ref) + 0.005  # ms printed to 0.1, ratio to 0.01
        assert mine > 0 and ref > 0 and ratio == pytest.approx(mine / ref, abs=rounding)
