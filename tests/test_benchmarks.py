"""The benchmark scripts run end to end at toy sizes (their figures are measured, never asserted)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from cakes.ops import plan
from cakes.profile import profile
from cakes.utils import cpu_model, git_commit

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| case") and not line.startswith("| shape")
    ]


@pytest.mark.slow
def test_ops_benchmark_prints_both_layouts_and_the_naive_form(capsys):
    load("ops").main(
        ["--only", "res5", "--splits", "thirds", "--reps", "1", "--warmup", "0", "--naive", "--batch", "1"]
    )
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "track, net, shape, width",
    [("video", "ssv1_cakes23d_c", "2x32:1", 0.0625), ("volume", "uniform v123d", "32:1", 0.0625)],
)
def test_network_benchmark_pairs_each_net_with_its_baseline(tmp_path, capsys, track, net, shape, width):
    """One pair in its worker process at a toy width: table, JSON of every timing and the PNG."""
    network = load("network")
    rows = network.main(
        [
            "--track",
            track,
            "--only",
            net,
            "--shapes",
            shape,
            "--width",
            str(width),
            "--reps",
            "2",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    (row,) = rows
    with torch.device("meta"):  # the MAC ratio is the closed-form count of the two networks
        macs = [
            profile(network.build(track, n, width, None), network.parse_shape(track, shape)).macs
            for n in (network.TRACKS[track].baseline, net)
        ]
    assert row.arch == net and row.mac_ratio == pytest.approx(macs[1] / macs[0])
    assert 0 < row.mac_ratio < 1 and set(row.ms) == {"train", "eval"}
    assert all(min(times) > 0 for times in row.ms.values())
    with torch.device("meta"):  # the slot-free baseline has the baseline's MACs minus its slot convolutions
        rest = profile(
            network.build(track, "x" + network.SLOT_FREE, width, None), network.parse_shape(track, shape)
        ).macs
    assert 0 < rest < macs[1] and row.slot_mac_ratio == pytest.approx((macs[1] - rest) / (macs[0] - rest))
    base_slot_macs = macs[0] - rest
    saved = json.loads((tmp_path / f"network_{track}.json").read_text())
    assert f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})" in saved["settings"]  # whose figures
    assert f"commit {git_commit()}" in saved["settings"] and "batch norms folded in inference" in saved["settings"]
    times = saved["times"][f"{shape} {net}"]
    baseline = network.TRACKS[track].baseline
    timed = (baseline, net, baseline + network.NATIVE, baseline + network.SLOT_FREE)
    assert all(len(times[m][n]) == 2 for m in ("train", "eval") for n in timed)
    timings, rates = (tmp_path / f"network_{track}.md").read_text().split(network.RATES_HEADING)
    (line,) = table_rows(timings)
    assert line[:3] == [shape, net, f"{row.mac_ratio:.3f}"]
    assert float(line[7]) == pytest.approx(row.ratio("train"), abs=5e-4)
    base, arch, native, rest = row.ms["train"]
    assert float(line[9]) == pytest.approx(arch / native, abs=5e-4)
    slot = (arch - rest) / (base - rest) / row.slot_mac_ratio
    bound = (rest + (base - rest) * row.slot_mac_ratio) / base / row.mac_ratio
    assert float(line[11]) == pytest.approx(slot, abs=5e-3) and float(line[12]) == pytest.approx(bound, abs=5e-3)
    (rate_line,) = table_rows(rates)  # the slot convolutions' GMAC/s: 3 passes of the slot MACs in training
    assert rate_line[:2] == [shape, net] and row.base_slot_gmac == pytest.approx(base_slot_macs / 1e9)
    assert float(rate_line[2]) == pytest.approx(3 * row.base_slot_gmac / (base - rest), abs=0.5)
    assert float(rate_line[3]) == pytest.approx(3 * row.base_slot_gmac * row.slot_mac_ratio / (arch - rest), abs=0.5)
    assert saved["reference_gemm_gmacs"][0] > 0 and "reference float32 GEMM 2048²" in saved["settings"]
    assert (tmp_path / f"network_{track}.png").read_bytes()[:4] == b"\x89PNG"
    assert "load average at start" in capsys.readouterr().out
    (tmp_path / f"network_{track}.png").unlink()  # --replot redraws it from the JSON, timing nothing
    assert network.main(["--replot", str(tmp_path / f"network_{track}.json")]) == []
    assert (tmp_path / f"network_{track}.png").read_bytes()[:4] == b"\x89PNG"


def test_network_benchmark_rates_hold_the_whole_network_to_its_target(tmp_path):
    """The needed slot rate is the one at which the whole network lands exactly on its target; a rest
    that alone takes longer than the target allows makes it unreachable."""
    network = load("network")
    # baseline 1.0 s of which 0.4 s rest; the architecture 0.5 of the MACs, its slots 0.25 of the slots'
    row = network.Row("video", "8x112:1", "a", 0.5, 0.25, {"train": (1.0, 0.7, 1.0, 0.4)}, base_slot_gmac=12.0)
    base_rate, arch_rate, needed = row.slot_rates("train")
    assert base_rate == pytest.approx(36 / 0.6) and arch_rate == pytest.approx(9 / 0.3)
    arch_at_needed = 0.4 + 9 / needed  # the rest plus the slots at the needed rate
    assert arch_at_needed / 1.0 / 0.5 == pytest.approx(network.TARGETS["train"])
    row.ms["eval"] = (1.0, 0.7, 1.0, 0.6)  # 0.6 s rest > 1.10 · 0.5 · 1.0 s
    assert row.slot_rates("eval")[2] == float("inf")
    assert "| unreachable |" in network.rates_table([row], ["eval"])
    empty = tmp_path / "network_video.json"
    empty.write_text(json.dumps({"settings": "", "rows": [], "times": {}}))
    with pytest.raises(SystemExit, match="holds no rows"):
        network.main(["--replot", str(empty)])
    empty.write_text(json.dumps({"rows": [{"track": "video", "ms": {}}]}))  # a row without its fields
    with pytest.raises(SystemExit, match="cannot read .*network_video.json"):
        network.main(["--replot", str(empty)])
    row.ms["eval"] = (1.0, 0.7, float("nan"), float("nan"))  # one-process runs time no slot-free network
    assert network.rates_table([row], ["eval"]).splitlines()[-1] == "| 8x112:1 | a | – | – | – |"
    assert network.reference_gemm_rate(torch.device("cpu"), size=64, reps=1) > 0


def test_network_benchmark_fits_archs_to_any_width_and_checks_its_arguments():
    network = load("network")
    arch = network.load_arch(network.ROOT / "archs" / "ssv1_cakes123d_p.yaml")
    slots = network.ResNet3d.slots(depth=50, width=0.125)
    fitted = network.fit_arch(arch, slots)
    for name, width in slots.items():
        assert sum(fitted.layers[name].values()) == width
        for k, n in fitted.layers[name].items():  # largest remainder: within one channel of the exact share
            assert abs(n - arch.layers[name][k] * width / sum(arch.layers[name].values())) < 1
    doubled = network.fit_arch(arch, {name: 2 * w for name, w in network.ResNet3d.slots(depth=50, width=1.0).items()})
    assert all(doubled.layers[n] == {k: 2 * c for k, c in arch.layers[n].items()} for n in arch.layers)
    assert network.parse_shape("video", "8x112:2") == (2, 3, 8, 112, 112)
    assert network.parse_shape("volume", "96:1") == (1, 1, 96, 96, 96)
    with pytest.raises(SystemExit, match=r"--shapes: cannot read '8x112' for the video track"):
        network.parse_shape("video", "8x112")
    with pytest.raises(SystemExit):
        network.main(["--only", "C3D2"])
    with pytest.raises(SystemExit):
        network.main(["--track", "volume", "--only", "found"])  # needs --found


def test_native_step_runs_plain_modules_and_the_planned_step_does_not(monkeypatch):
    """The native baseline is the network of plain ``nn.Conv3d`` calls: its 1x1x1 convolutions are
    ``conv3d`` (the GEMM off with the fast path); the planned step runs them as GEMMs."""
    network = load("network")
    from torch.nn import functional as F

    gemms = []
    linear = F.linear

    def counting(x, *args, **kwargs):
        if x.dim() == 5:  # a 1x1x1 convolution's GEMM (the head's Linear sees 2-D features)
            gemms.append(1)
        return linear(x, *args, **kwargs)

    monkeypatch.setattr(F, "linear", counting)
    net = network.build("video", "C3D", 0.125, None).to(memory_format=network.CL)
    x = torch.randn(1, 3, 2, 32, 32).contiguous(memory_format=network.CL)
    target = torch.zeros(1, dtype=torch.long)
    network.step_fn(net, x, target, "eval", native=True)()
    assert gemms == []
    network.step_fn(net, x, target, "eval")()
    assert len(gemms) > 0


def test_inference_is_timed_on_folded_copies_of_every_network():
    """Inference runs each network with its batch norms folded (a copy: training keeps its norms);
    the slot-free network loses its slots' norms with the slot convolutions they fold into."""
    network = load("network")
    from torch import nn

    def norms(net: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())

    x = torch.randn(1, 3, 2, 32, 32)
    for name in ("C3D", "ssv1_cakes12d_c", "C3D" + network.SLOT_FREE):
        net = network.build("video", name, 0.125, None)
        folded = network.inference_copy(net, fold=True)
        assert folded is not net and norms(folded) == 0 and norms(net) == 53
        if not name.endswith(network.SLOT_FREE):
            with torch.no_grad():
                assert torch.allclose(folded(x), net.eval()(x), atol=1e-6)
        assert network.inference_copy(net, fold=False) is net and not net.training


@pytest.mark.parametrize("layout", [torch.channels_last_3d, torch.contiguous_format])
def test_slot_free_stand_in_keeps_its_input_layout_forward_and_backward(layout):
    """The zero-MAC stand-in of a strided slot is the subsampled input, with slicing's values and
    gradient, and both in the input's layout (as a real slot convolution's input gradient is): a
    gradient in another layout would time mixed-layout kernels that no real network runs."""
    network = load("network")
    view = network.StridedView(4, (1, 2, 2))
    leaf = torch.randn(1, 4, 3, 6, 6).contiguous(memory_format=layout).requires_grad_()
    x = leaf * 1  # not a leaf: its hook sees the gradient as the layer before would (a leaf's is re-laid)
    arrived = []
    x.register_hook(arrived.append)
    out = view(x)
    assert torch.equal(out, leaf[:, :, :, ::2, ::2]) and out.is_contiguous(memory_format=layout)
    grad = torch.randn_like(out)
    out.backward(grad)
    (reference,) = torch.autograd.grad(leaf[:, :, :, ::2, ::2], leaf, grad)
    assert torch.equal(arrived[0], reference) and arrived[0].is_contiguous(memory_format=layout)
    assert network.StridedView(4, (1, 1, 1))(x) is x  # a stride-1 slot is the input itself


def test_network_table_marks_untimed_cells_instead_of_printing_nan():
    """onnxruntime has no native baseline: its cells read ``–``, the timed ones keep their values."""
    network = load("network")
    nan = float("nan")
    row = network.Row(
        "video",
        "8x112:1",
        "ssv1_cakes23d_p",
        0.8,
        0.75,
        {"eval": (0.4, 0.36, 0.6, 0.15), "onnx": (0.3, 0.27, nan, 0.1)},
    )
    (cells,) = table_rows(network.table([row], ["eval", "onnx"]))
    assert "nan" not in " ".join(cells)
    eval_cells, onnx_cells = cells[3:13], cells[13:23]
    assert eval_cells[:5] == ["400", "600", "150", "360", "0.900"]
    assert onnx_cells[1] == "–" and onnx_cells[6:8] == ["–", "–"]  # native base ms, ratio vs native, ÷ MAC vs native
    assert onnx_cells[4] == "0.900" and onnx_cells[0] == "300"
    saved = json.loads(json.dumps(network.untimed_as_null(network.asdict(row)), allow_nan=False))  # strict JSON
    assert saved["ms"]["onnx"] == [0.3, 0.27, None, 0.1] and saved["ms"]["eval"] == [0.4, 0.36, 0.6, 0.15]


@pytest.mark.slow
def test_one_process_run_times_each_network_interleaved_and_back_to_back(tmp_path):
    """``--one-process``: every network in this process, timed round-robin and back to back with itself;
    the appended table's ratio is the median over rounds of interleaved step / back-to-back step."""
    network = load("network")
    nets = ["C2D", "ssv1_cakes23d_c"]
    rows = network.main(
        ["--one-process", "--only", *nets, "--shapes", "2x32:1", "--width", "0.0625", "--reps", "3", "--warmup", "0"]
        + ["--out", str(tmp_path)]
    )
    assert [r.arch for r in rows] == nets
    saved = json.loads((tmp_path / "network_video.json").read_text())
    mixed = saved["times"]["2x32:1 C2D"]  # the one process's timings, recorded under each network
    alone = mixed["back_to_back"]
    assert set(alone) == {"train", "eval"}
    text = (tmp_path / "network_video.md").read_text()
    sharing = table_rows(text.split(network.SHARING_HEADING)[1])  # shape, network, 3 cells per mode
    assert [line[1] for line in sharing] == ["C3D", *nets]
    for line in sharing:
        name = line[1]
        for mode, cells in (("train", line[2:5]), ("eval", line[5:8])):
            assert len(alone[mode][name]) == len(mixed[mode][name]) == 3
            m, a = (sorted(t)[1] for t in (mixed[mode][name], alone[mode][name]))  # medians of 3
            assert float(cells[0]) == pytest.approx(m * 1e3, abs=0.5)
            assert float(cells[1]) == pytest.approx(a * 1e3, abs=0.5)
            per_round = sorted(x / y for x, y in zip(mixed[mode][name], alone[mode][name], strict=True))
            assert float(cells[2]) == pytest.approx(per_round[1], abs=5e-4)


@pytest.mark.parametrize(("execution", "mode"), [("packed", "eval"), ("im2col", "train")])
def test_withhold_benchmark_runs_both_variants_with_their_own_plans(execution, mode, capsys, fresh_plan):
    """The A/B runs the network with the execution allowed and withheld, each variant with its own
    plan caches, and leaves the process's plan and gates as they were."""
    module = load("withhold")
    gate = module.GATES[execution]
    predicate = getattr(*gate)
    toy = ["--only", "ssv1_cakes12d_c", "--shape", "2x16:1", "--width", "0.125", "--rounds", "2"]
    times = module.main([execution, "--mode", mode, *toy])
    assert set(times) == {(n, a) for n in ("C3D", "ssv1_cakes12d_c") for a in (False, True)}
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    rows = table_rows(capsys.readouterr().out)[1:]  # below the header
    assert [r[0] for r in rows] == ["C3D", "ssv1_cakes12d_c"] and "→" in rows[1][4]
    assert getattr(*gate) is predicate and plan.choices() == {} and plan.pointwise_choices() == {}
