"""``python -m cakes.report``: the accuracy-vs-cost comparison of a track, run through the entry points.

    python -m cakes.report track=video seeds=5          # baselines, lasso sweep, both searches + retrains
    python -m cakes.report track=volume seeds=3 out=reports/volume
    python -m cakes.report only=[C3D,found_cost_s_0.0001] seeds=2 dry_run=true   # labels or their run-dir names

Every model × seed is one ``train.py`` / ``search.py`` run in ``<out>/runs/<model>/seed<S>`` (its
console output in ``<out>/logs/``); a found architecture is retrained from the yaml its own search
wrote into its run directory (starting from that search's last checkpoint when the track says
``retrain_init: supernet``, as the demo searches' printed retrain commands do). A run whose
``metrics.json`` exists is never run again — its metrics are read back — and an interrupted one
continues with ``resume=auto``. The report (``<out>/report.md``, ``report.json``, ``report.png``:
the metric against GMACs per view with ±1 sd error bars and the Pareto front) is rewritten after
every run, so it is readable while the sweep goes on. Runs go seed by seed, so a stopped report
holds whole seeds. Exit status 1 if a run failed (the others still run; a failed search skips its
retrain).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cakes.config import register_resolvers
from cakes.figures import save_figure
from cakes.files import write_atomic
from cakes.utils import conf_dir

#: the entry points live next to ``conf/``
REPO = conf_dir().parent
RECORD = "report_run.json"  # per run directory: command, wall time, cost, written when the run finished


@dataclass
class Run:
    """One job: ``script`` with ``overrides`` at ``seed`` in ``run_dir``; a retrain names its ``search``."""

    model: str
    kind: str  # baseline | search | retrain
    script: str
    overrides: list[str]
    seed: int
    run_dir: Path
    search: Run | None = None

    @property
    def done(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()

    def metrics(self) -> dict[str, float]:
        return json.loads((self.run_dir / "metrics.json").read_text())

    def record(self) -> dict[str, Any]:
        path = self.run_dir / RECORD
        return json.loads(path.read_text()) if path.is_file() else {}


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_")


def seeds_of(cfg: DictConfig) -> list[int]:
    seeds = cfg.seeds
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: a count >= 1 or a list of seeds, got {seeds}")
        return list(range(seeds))
    values = [int(s) for s in seeds]
    if not values or len(set(values)) != len(values):
        raise ValueError(f"seeds: a count >= 1 or a list of distinct seeds, got {list(seeds)}")
    return values


def plan(cfg: DictConfig) -> list[Run]:
    """Every run of the report, seed by seed; each retrain directly after its search."""
    track, root = cfg.track, Path(cfg.out) / "runs"
    models: list[tuple[str, str, str, list[str]]] = [
        (label, "baseline", "train.py", list(ov)) for label, ov in track.baselines.items()
    ]
    for mode, overrides in track.searches.items():
        for lasso in track.lasso if mode == "cost" else [None]:
            label = f"found {mode}" + (f" s={lasso:g}" if lasso is not None else "")
            lasso_override = [f"search.lasso={lasso}"] if lasso else []
            models.append((label, "search", "search.py", list(overrides) + lasso_override))
    labels = [m[0] for m in models]
    known = set(labels) | {slug(label) for label in labels}
    unknown = [name for name in cfg.only if name not in known]
    if unknown:
        raise ValueError(
            f"only: unknown models {unknown}; this track has {labels} (or as directory names: "
            f"{[slug(label) for label in labels]})"
        )
    if cfg.only:
        models = [m for m in models if m[0] in cfg.only or slug(m[0]) in cfg.only]
    runs: list[Run] = []
    for seed in seeds_of(cfg):
        for label, kind, script, overrides in models:
            run = Run(label, kind, script, overrides, seed, root / slug(label) / f"seed{seed}")
            if kind == "search":
                run.run_dir = root / slug(label) / "search" / f"seed{seed}"
                runs.append(run)
                retrain = list(track.retrain)
                if track.get("retrain_init", "scratch") == "supernet":
                    retrain.append(f"init=supernet:{(run.run_dir / 'checkpoints' / 'last.ckpt').resolve()}")
                run = Run(label, "retrain", "train.py", retrain, seed, root / slug(label) / f"seed{seed}", search=run)
            runs.append(run)
    return runs


def found_arch_file(search: Run) -> Path:
    """The arch yaml a finished search wrote into its own run directory."""
    files = sorted((search.run_dir / "arch").glob("*.yaml"))
    if len(files) != 1:
        raise RuntimeError(
            f"{search.run_dir / 'arch'}: expected the one arch yaml of this search, found "
            f"{[f.name for f in files] or 'none'}"
        )
    return files[0].resolve()


def command(run: Run, extra: Sequence[str]) -> list[str]:
    args = [sys.executable, str(REPO / run.script), *run.overrides]
    if run.search is not None:
        args.append(f"arch={found_arch_file(run.search)}")
    return args + [*extra, f"seed={run.seed}", f"hydra.run.dir={run.run_dir.resolve()}", "resume=auto"]


def cost(run_dir: Path) -> dict[str, float]:
    """Params and GMACs per view of the network a finished run trained (from its resolved config)."""
    import torch

    from cakes.builders import build_network
    from cakes.profile import profile

    cfg = OmegaConf.load(run_dir / "config_resolved.yaml")
    with torch.device("meta"):
        net = build_network(OmegaConf.to_container(cfg.model.net, resolve=True), pretrained=False)
    result = profile(net, (1, *(int(s) for s in cfg.model.input_shape)))
    return {"params": result.params, "gmacs": result.macs / 1e9}


def execute(run: Run, extra: Sequence[str], log_dir: Path) -> None:
    """Run one job to completion (continuing an interrupted one) and record its wall time and cost."""
    args = command(run, extra)
    log_path = log_dir / f"{slug(run.model)}{'_search' if run.kind == 'search' else ''}_seed{run.seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    resumed = (run.run_dir / "checkpoints").is_dir()
    start = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run(args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if proc.returncode != 0 or not run.done:
        raise RuntimeError(f"exit status {proc.returncode}; see {log_path}")
    record = {"command": args[1:], "wall_s": round(wall, 1), "resumed": resumed, "log": str(log_path)}
    if run.kind != "search":
        record.update(cost(run.run_dir))
    write_atomic(run.run_dir / RECORD, json.dumps(record, indent=2) + "\n")


# --- summary -----------------------------------------------------------------------------------------
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(cfg: DictConfig, runs: list[Run]) -> list[dict[str, Any]]:
    """One row per model (in plan order) over its finished seeds."""
    track = cfg.track
    val_metric = str(track.metric).replace("test/", "val/", 1)
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        row = rows.setdefault(
            run.model,
            {
                "model": run.model,
                "kind": "found" if run.search or run.kind == "search" else "baseline",
                "seeds": [],
                "metric": [],
                "also": {},
                "gmacs": [],
                "params": [],
                "wall_s": [],
                "supernet": [],
                "search_wall_s": [],
            },
        )
        if not run.done:
            continue
        metrics, record = run.metrics(), run.record()
        if run.kind == "search":
            if val_metric in metrics:
                row["supernet"].append(metrics[val_metric])
            row["search_wall_s"].append(record.get("wall_s"))
            continue
        row["seeds"].append(run.seed)
        row["metric"].append(metrics.get(str(track.metric), float("nan")))
        for key in track.get("also", []):
            row["also"].setdefault(key, []).append(metrics.get(key, float("nan")))
        for key in ("gmacs", "params", "wall_s"):
            row[key].append(record.get(key))
    reference = rows.get(track.baseline, {}).get("gmacs") or [None]
    for row in rows.values():
        row["mac_ratio"] = (statistics.fmean(row["gmacs"]) / reference[0]) if row["gmacs"] and reference[0] else None
    return list(rows.values())


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _per_seed(seeds: list[int], values: list[float]) -> str:
    return ", ".join(f"{s}: {v:.3f}" for s, v in zip(seeds, values, strict=True)) or "—"


def markdown(cfg: DictConfig, rows: list[dict[str, Any]]) -> str:
    """The report table: one row per model; found models' GMACs vary with the seed (mean ± sd)."""
    track = cfg.track
    also = list(track.get("also", []))
    header = [
        "model",
        "GMACs",
        f"MAC ratio vs {track.baseline}",
        "params",
        f"{track.metric_label} (mean ± sd)",
        "per seed",
        *[f"{key} (mean ± sd; per seed)" for key in also],
        "supernet val (mean ± sd)",
        "wall s per seed",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        walls = [w for w in row["wall_s"] if w is not None]
        search_walls = [w for w in row["search_wall_s"] if w is not None]
        wall = f"{statistics.fmean(walls):.0f}" if walls else "—"
        if search_walls:
            wall += f" + search {statistics.fmean(search_walls):.0f}"
        cells = [
            row["model"],
            _fmt(row["gmacs"], 4) if row["kind"] == "found" else (f"{row['gmacs'][0]:.4f}" if row["gmacs"] else "—"),
            f"{row['mac_ratio']:.3f}" if row["mac_ratio"] is not None else "—",
            f"{statistics.fmean(row['params']):,.0f}" if row["params"] else "—",
            _fmt(row["metric"]),
            _per_seed(row["seeds"], row["metric"]),
            *[f"{_fmt(row['also'].get(key, []))}; {_per_seed(row['seeds'], row['also'].get(key, []))}" for key in also],
            _fmt(row["supernet"]) if row["kind"] == "found" else "",
            wall,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal GMACs and a higher metric), by GMACs."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(cfg: DictConfig, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Metric vs GMACs per view, ±1 sd error bars over seeds, the Pareto front drawn and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["metric"] and r["gmacs"]]
    if not shown:
        return None
    points = [(statistics.fmean(r["gmacs"]), statistics.fmean(r["metric"])) for r in shown]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for row, (x, y) in zip(shown, points, strict=True):
        _, y_sd = mean_sd(row["metric"])
        _, x_sd = mean_sd(row["gmacs"])
        ax.errorbar(
            x,
            y,
            yerr=y_sd,
            xerr=x_sd,
            fmt="o" if row["kind"] == "baseline" else "s",
            capsize=3,
            label=f"{row['model']} (n={len(row['metric'])})",
        )
        ax.annotate(row["model"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    front = pareto(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.scatter(
        [points[i][0] for i in front], [points[i][1] for i in front], s=160, facecolors="none", edgecolors="k", lw=1
    )
    ax.set_xlabel("GMACs per view")
    ax.set_ylabel(f"{cfg.track.metric_label} (mean ± sd over seeds)")
    ax.set_title(f"{cfg.track.name} track: accuracy vs cost", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def write_report(cfg: DictConfig, runs: list[Run]) -> None:
    out = Path(cfg.out)
    rows = summarise(cfg, runs)
    title = f"# cakes report: {cfg.track.name} track, seeds {seeds_of(cfg)}\n\n"
    write_atomic(out / "report.md", title + markdown(cfg, rows))
    write_atomic(
        out / "report.json",
        json.dumps({"track": cfg.track.name, "seeds": seeds_of(cfg), "rows": rows}, indent=2) + "\n",
    )
    plot(cfg, rows, out / "report.png")


# --- entry point -------------------------------------------------------------------------------------
def compose_report_config(overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="report", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> int:
    """Run what is missing, then write the report; 0 if every run finished, 1 otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    register_resolvers()
    try:
        cfg = compose_report_config(args)
        runs = plan(cfg)
    except Exception as err:  # composition and plan errors: one clear line, no traceback
        print(f"cakes.report: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    extra, log_dir = list(cfg.extra), Path(cfg.out) / "logs"
    failed: list[Run] = []
    for k, run in enumerate(runs, 1):
        name = f"[{k}/{len(runs)}] {run.model}{' (search)' if run.kind == 'search' else ''}, seed {run.seed}"
        metric = str(cfg.track.metric) if run.kind != "search" else str(cfg.track.metric).replace("test/", "val/", 1)
        if run.done:
            print(f"{name}: finished earlier, {metric} = {run.metrics().get(metric, float('nan')):.3f}", flush=True)
            continue
        if cfg.dry_run:
            state = "to resume" if (run.run_dir / "checkpoints").is_dir() else "to run"
            print(f"{name}: {state}: {run.script} {' '.join(run.overrides)}", flush=True)
            continue
        if run.search is not None and (run.search in failed or not run.search.done):
            print(f"{name}: skipped (its search did not finish)", flush=True)
            failed.append(run)
            continue
        print(f"{name}: running ...", end=" ", flush=True)
        start = time.monotonic()
        try:
            execute(run, extra, log_dir)
        except RuntimeError as err:
            print(f"FAILED ({err})", flush=True)
            failed.append(run)
            continue
        print(f"{time.monotonic() - start:.0f} s, {metric} = {run.metrics().get(metric, float('nan')):.3f}", flush=True)
        write_report(cfg, runs)
    write_report(cfg, runs)
    print(
        f"report: {Path(cfg.out) / 'report.md'} and report.png ({sum(r.done for r in runs)} of {len(runs)} runs "
        f"finished)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
