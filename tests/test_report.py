"""The report command: plans every model × seed, runs them through train.py / search.py, writes the
table and the plot, and on a rerun reads finished runs back instead of running them again."""

from __future__ import annotations

import json
import subprocess

import pytest
from omegaconf import OmegaConf

from cakes import report
from conftest import TINY_VIDEO

TINY = [*TINY_VIDEO, "trainer.max_epochs=1", "+trainer.limit_train_batches=2"]


def test_plan_runs_each_retrain_after_its_search_seed_by_seed(tmp_path):
    cfg = report.compose_report_config([f"out={tmp_path}", "seeds=2", "track.lasso=[1e-4,1e-2]"])
    runs = report.plan(cfg)
    labels = ["C2D", "P3D", "C3D", "uniform 1,2D", "found cost s=0.0001", "found cost s=0.01", "found performance"]
    per_seed = len(labels) + 3  # every found model is a search and a retrain
    assert len(runs) == 2 * per_seed
    assert [r.seed for r in runs] == [0] * per_seed + [1] * per_seed
    for i, run in enumerate(runs):
        if run.kind == "retrain":
            assert runs[i - 1] is run.search and run.search.kind == "search" and run.search.seed == run.seed
            inherit = f"init=supernet:{(run.search.run_dir / 'checkpoints' / 'last.ckpt').resolve()}"
            assert run.script == "train.py" and run.overrides == ["experiment=demo_cakes", inherit]
    perf = next(r for r in runs if r.model == "found performance" and r.kind == "search")
    assert perf.overrides == ["experiment=demo_search_perf"]
    cost = next(r for r in runs if r.model == "found cost s=0.01" and r.kind == "search")
    assert cost.overrides[-1] == "search.lasso=0.01"
    assert len({r.run_dir for r in runs}) == len(runs)  # every run its own directory
    scratch = report.plan(report.compose_report_config([f"out={tmp_path}", "seeds=1", "track.retrain_init=scratch"]))
    assert all(r.overrides == ["experiment=demo_cakes"] for r in scratch if r.kind == "retrain")


def test_bad_report_settings_are_named():
    with pytest.raises(ValueError, match=r"only: unknown models \['C4D'\]"):
        report.plan(report.compose_report_config(["only=[C4D]"]))
    with pytest.raises(ValueError, match="seeds: a count >= 1"):
        report.plan(report.compose_report_config(["seeds=0"]))
    assert report.main(["track=audio"]) == 2  # a clear one-line error, no traceback


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.9), (1.5, 0.4), (3.0, 0.9), (0.5, 0.2)]
    assert report.pareto(points) == [4, 0, 1]


@pytest.mark.slow
def test_report_runs_writes_table_and_plot_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAKES_ROOT", str(tmp_path))
    out = tmp_path / "report"
    extra = "[" + ",".join(f"'{o}'" for o in TINY) + "]"
    args = [f"out={out}", "seeds=2", "only=[C3D,found_cost_s_0.0001]", "track.lasso=[1e-4]", f"extra={extra}"]
    assert report.main(args) == 0
    table = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines()[4:]}
    assert set(rows) == {"C3D", "found cost s=0.0001"}
    data = json.loads((out / "report.json").read_text())
    for row in data["rows"]:
        assert row["seeds"] == [0, 1] and len(row["metric"]) == 2 and all(0 <= m <= 1 for m in row["metric"])
        assert all(g > 0 for g in row["gmacs"]) and all(w > 0 for w in row["wall_s"])
    found = next(r for r in data["rows"] if r["model"] == "found cost s=0.0001")
    assert len(found["supernet"]) == 2 and found["mac_ratio"] <= 1.0
    assert (out / "report.png").stat().st_size > 10_000
    # the retrain trained exactly the yaml its own search wrote
    search_arch = next((out / "runs" / "found_cost_s_0.0001" / "search" / "seed1" / "arch").glob("*.yaml"))
    retrain_cfg = OmegaConf.load(out / "runs" / "found_cost_s_0.0001" / "seed1" / "config_resolved.yaml")
    assert OmegaConf.to_container(retrain_cfg.operator.arch.layers) == OmegaConf.to_container(
        OmegaConf.load(search_arch).layers
    )

    # a rerun runs nothing and reads every metric back
    capsys.readouterr()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a} again"))
    before = (out / "report.json").read_text()
    assert report.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier") == 6
    assert json.loads((out / "report.json").read_text()) == json.loads(before)
