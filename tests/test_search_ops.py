"""Search-time operators: the lasso, performance-priority sampling/eval/derive, selection rules,
supernet ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cakes.callbacks.supernet import apply_lasso
from cakes.ops import (
    OP_SETS,
    ChannelSampler,
    CostPriority,
    CostPrioritySlot,
    PerformancePriority,
    inflate_2d,
)
from cakes.ops.inflate import marginal
from cakes.ops.search import cost_shares
from cakes.utils import mix_seed


def cost_slot(op_set="c123d", width=4, in_channels=3, cost="volume") -> CostPrioritySlot:
    return CostPriority(op_set, cost=cost)(layer="l", in_channels=in_channels, out_channels=width, norm=nn.BatchNorm3d)


def perf_slot(op_set="c123d", width=6, in_channels=3, sampling="per_channel", selection="auto", shared_kernel=False):
    factory = PerformancePriority(op_set, sampling=sampling, selection=selection, seed=0, shared_kernel=shared_kernel)
    return factory(layer="l", in_channels=in_channels, out_channels=width, norm=nn.BatchNorm3d)


def test_cost_shares_follow_kernel_volume():
    assert cost_shares(OP_SETS["c123d"]) == pytest.approx([9 / 13, 3 / 13, 1 / 13])
    assert cost_shares(OP_SETS["c23d"]) == pytest.approx([3 / 4, 1 / 4])
    assert cost_shares(OP_SETS["c12d"]) == pytest.approx([3 / 4, 1 / 4])
    assert cost_shares(OP_SETS["c12d"], {"1x3x3": 2.0, "3x1x1": 2.0}) == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match=r"no entry for \['3x1x1'\]"):
        cost_shares(OP_SETS["c12d"], {"1x3x3": 1.0})


def test_cost_slot_shapes():
    slot = cost_slot(width=4)
    assert slot.out_channels == 12 and slot.norm.num_features == 12
    out = slot(torch.randn(2, 3, 4, 6, 6))
    assert out.shape == (2, 12, 4, 6, 6)
    assert slot.cost_weights.tolist() == pytest.approx([9 / 13] * 4 + [3 / 13] * 4 + [1 / 13] * 4)


def test_lasso_changes_only_operator_gamma_grads_by_exactly_s_w_sign():
    torch.manual_seed(0)
    slot = cost_slot(width=4)
    head = nn.Sequential(nn.Conv3d(12, 5, 1), nn.BatchNorm3d(5))
    net = nn.Sequential(slot, nn.ReLU(), head)
    with torch.no_grad():
        slot.norm.weight.copy_(torch.randn(12))  # mixed signs
    x = torch.randn(2, 3, 4, 6, 6)

    def grads():
        net.zero_grad()
        net(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    before = grads()
    grads()  # recompute to put fresh grads in place
    strength = 0.37
    assert apply_lasso(net, strength) == 1
    after = {n: p.grad.clone() for n, p in net.named_parameters()}
    gamma = slot.norm.weight.detach()
    for name in before:
        if name == "0.norm.weight":
            expected = before[name] + strength * slot.cost_weights * torch.sign(gamma)
            torch.testing.assert_close(after[name], expected, atol=1e-7, rtol=0)
            assert not torch.allclose(after[name], before[name])
        else:
            torch.testing.assert_close(after[name], before[name], atol=0, rtol=0)


@pytest.mark.parametrize("rule", ["layer_topk", "channel_argmax"])
def test_selection_rules_on_hand_set_gammas(rule):
    slot = cost_slot(op_set="c123d", width=4)
    gamma = torch.tensor(
        [
            # 3x3x3 per channel
            0.9,
            0.1,
            0.8,
            0.05,
            # 1x3x3
            0.2,
            0.7,
            0.85,
            0.1,
            # 3x1x1
            -0.3,
            0.6,
            0.0,
            -0.95,
        ]
    )
    with torch.no_grad():
        slot.norm.weight.copy_(gamma)
    counts = slot.counts(rule)
    if rule == "layer_topk":  # top 4 |γ|: 0.95(1D), 0.9(3D), 0.85(2D), 0.8(3D)
        assert counts == {"3x3x3": 2, "1x3x3": 1, "3x1x1": 1}
    else:  # per channel argmax: c0 3D, c1 2D, c2 2D, c3 1D
        assert counts == {"3x3x3": 1, "1x3x3": 2, "3x1x1": 1}
    assert sum(counts.values()) == 4


def test_samplers_draw_valid_selections():
    sampler = ChannelSampler("per_channel", seed=1)
    ops, channels = sampler.sample(3, 10)
    assert channels.tolist() == list(range(10)) and ops.min() >= 0 and ops.max() < 3
    sampler = ChannelSampler("pair_subset", seed=1)
    ops, channels = sampler.sample(3, 10)
    entries = ops * 10 + channels
    assert len(set(entries.tolist())) == 10 and entries.tolist() == sorted(entries.tolist())
    sampler = ChannelSampler("split_uniform", seed=1)
    firsts = []
    for _ in range(400):
        ops, channels = sampler.sample(2, 6)
        first = int((ops == 0).sum())
        firsts.append(first)
        assert ops.tolist() == [0] * first + [1] * (6 - first)  # op-major
        for k in (0, 1):  # each op's channels: distinct, ascending
            rows = channels[ops == k].tolist()
            assert rows == sorted(set(rows))
    assert set(firsts) == set(range(7))  # 0..C_out, every split drawn
    assert max(firsts.count(m) for m in range(7)) < 2.5 * min(firsts.count(m) for m in range(7))
    a = ChannelSampler("per_channel", seed=5).sample(3, 50)[0]
    b = ChannelSampler("per_channel", seed=5).sample(3, 50)[0]
    assert torch.equal(a, b)
    assert mix_seed(0, 0, 0, 1) != mix_seed(0, 1, 0, 1)  # ranks draw different streams


@pytest.mark.parametrize("sampling", ["per_channel", "pair_subset"])
def test_performance_slot_training_computes_sampled_pairs_and_updates_bn(sampling):
    torch.manual_seed(0)
    slot = perf_slot(sampling=sampling, width=6)
    x = torch.randn(4, 3, 3, 5, 5)
    slot.sampler.seed(123)
    ops, channels = ChannelSampler(sampling, 123).sample(3, 6)
    out = slot(x)
    assert out.shape == (4, 6, 3, 5, 5)
    # output j is op ops[j] on channel channels[j], batch-normalised with its own entry
    for j in range(6):
        sub = slot.op_set.subkernels[int(ops[j])]
        w = slot.candidates.weights[sub.name][int(channels[j])].unsqueeze(0)
        ref = torch.nn.functional.conv3d(x, w, padding=sub.padding)
        ref = (ref - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + slot.norm.eps)
        torch.testing.assert_close(out[:, j : j + 1], ref, atol=1e-4, rtol=1e-4)
    # running statistics of exactly the sampled entries moved (the authors' code lost them)
    entries = set((ops * 6 + channels).tolist())
    moved = {i for i in range(18) if slot.norm.running_mean[i] != 0}
    assert moved == entries
    assert int(slot.norm.num_batches_tracked) == 1


@pytest.mark.parametrize("shared_kernel", [False, True])
@pytest.mark.parametrize(
    "op_set, sampling, rule",
    [
        ("c123d", "per_channel", "channel_argmax"),
        ("c123d", "pair_subset", "layer_topk"),
        ("c23d", "split_uniform", "layer_topk"),
    ],
)
def test_performance_slot_eval_is_deterministic_and_equals_derived(op_set, sampling, rule, shared_kernel):
    torch.manual_seed(0)
    slot = perf_slot(op_set=op_set, sampling=sampling, selection=rule, width=6, shared_kernel=shared_kernel)
    n = len(slot.op_set)
    x = torch.randn(2, 3, 4, 5, 5)
    slot.train()
    for _ in range(3):  # populate running statistics
        slot(x)
    with torch.no_grad():
        slot.norm.weight.copy_(torch.randn(n * 6))
    slot.eval()
    a, b = slot(x), slot(x)
    assert torch.equal(a, b)
    derived, order = slot.derive()
    derived.eval()
    torch.testing.assert_close(derived(x), a[:, order], atol=1e-5, rtol=1e-5)
    assert derived.conv.counts == slot.counts(rule)


def test_performance_step_costs_like_the_derived_width():
    """Only C_out rows are convolved per step (not n·C_out)."""
    from cakes.profile import profile

    slot = perf_slot(width=8, in_channels=4)
    slot.train()
    macs = profile(slot, (1, 4, 4, 6, 6)).macs  # profile runs eval: the current selection
    counts = slot.counts("channel_argmax")
    expected = 4 * 6 * 6 * 4 * sum({"3x3x3": 27, "1x3x3": 9, "3x1x1": 3}[k] * n for k, n in counts.items())
    assert macs == expected


def test_supernet_imagenet_init_each_op_from_all_rows():
    slot = cost_slot(op_set="c123d", width=4, in_channels=3)
    w2d = torch.randn(4, 3, 3, 3)
    bn = {"weight": torch.rand(4), "bias": torch.randn(4), "running_mean": torch.randn(4), "running_var": torch.rand(4)}
    loaded = slot.inflate_from_2d(w2d, bn)
    for name in ("3x3x3", "1x3x3", "3x1x1"):
        torch.testing.assert_close(slot.candidates.weights[name], inflate_2d(w2d, name))
    torch.testing.assert_close(slot.norm.weight, bn["weight"].repeat(3))
    assert "norm.running_var" in loaded and "candidates.weights.3x1x1" in loaded


@pytest.mark.parametrize(
    "sampling, layout", [("per_channel", "channel"), ("pair_subset", "op_major"), ("split_uniform", "op_major")]
)
def test_eval_puts_every_pair_where_training_puts_it(sampling, layout):
    """The layout contract behind eval consistency: a training draw and the eval selection agree
    on what an output position means (its channel, or its rank in op-major order)."""
    slot = perf_slot(op_set="c23d", sampling=sampling, width=8)
    with torch.no_grad():
        slot.norm.weight.copy_(torch.randn(16))
    for ops, channels in (slot.sampler.sample(2, 8), slot.select(slot.selection)):
        if layout == "channel":
            assert channels.tolist() == list(range(8))
        else:
            entries = (ops * 8 + channels).tolist()
            assert entries == sorted(entries) and len(set(entries)) == 8


def test_sampling_and_selection_must_agree():
    assert PerformancePriority("c123d", sampling="per_channel").selection == "channel_argmax"
    assert PerformancePriority("c123d", sampling="pair_subset").selection == "layer_topk"
    assert PerformancePriority("c23d", sampling="split_uniform").selection == "layer_topk"
    # the authors' code: 2,3D split uniformly, the other op sets by pair subsets
    assert PerformancePriority("c23d", sampling="authors").sampler.mode == "split_uniform"
    assert PerformancePriority("c123d", sampling="authors").sampler.mode == "pair_subset"
    assert PerformancePriority("c12d", sampling="authors").sampler.mode == "pair_subset"
    with pytest.raises(
        ValueError,
        match=r"search.selection=layer_topk does not fit search.sampling=per_channel.*"
        r"Use search.selection=channel_argmax",
    ):
        PerformancePriority("c123d", sampling="per_channel", selection="layer_topk")
    with pytest.raises(ValueError, match=r"selection=channel_argmax does not fit search.sampling=pair_subset"):
        PerformancePriority("c123d", sampling="pair_subset", selection="channel_argmax")
    with pytest.raises(ValueError, match=r"split_uniform splits a layer between two ops; op set c123d has 3"):
        PerformancePriority("c123d", sampling="split_uniform")


def test_bad_search_settings_raise():
    with pytest.raises(ValueError, match="sampling must be one of"):
        PerformancePriority("c12d", sampling="random")
    with pytest.raises(ValueError, match="selection must be one of"):
        PerformancePriority("c12d", selection="best")
    with pytest.raises(ValueError, match="search cost must be"):
        CostPriority("c12d", cost="flops")
    slot = cost_slot()
    with pytest.raises(ValueError, match="selection rule must be one of"):
        slot.counts("best")


@pytest.mark.parametrize("sub", ["3x3x3", "1x3x3", "3x1x1", "1x1x3", "3x3x1", "1x3x1", "3x1x3"])
def test_marginals_of_an_inflated_kernel_are_the_published_inflations(sub):
    w2d = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(marginal(inflate_2d(w2d, "3x3x3"), sub), inflate_2d(w2d, sub))


def test_shared_kernel_slot_runs_marginals_of_one_kernel():
    """Every op of a channel is the full kernel summed over the axes it drops, so a temporally
    constant clip gets the same 1x3x3 and 3x3x3 response, and one kernel is all that is trained."""
    torch.manual_seed(0)
    slot = perf_slot(op_set="c123d", width=6, shared_kernel=True)
    assert [tuple(p.shape) for p in slot.candidates.parameters()] == [(6, 3, 3, 3, 3)]
    full = slot.candidates.weights["3x3x3"]
    for sub in slot.op_set.subkernels:
        torch.testing.assert_close(slot.op_weight(sub), marginal(full, sub))
    static = torch.randn(1, 3, 1, 6, 6).expand(1, 3, 5, 6, 6)
    conv = torch.nn.functional.conv3d
    torch.testing.assert_close(
        conv(static, slot.op_weight(slot.op_set.subkernels[1]), padding=(0, 1, 1))[:, :, 1:-1],
        conv(static, full, padding=1)[:, :, 1:-1],
        atol=1e-5,
        rtol=1e-5,
    )
    slot.op_weight(slot.op_set.subkernels[2]).sum().backward()  # gradients of every op reach the one kernel
    assert full.grad is not None and full.grad.abs().sum() > 0
    # ImageNet init: the shared kernel inflated, so every op holds exactly its published inflation
    w2d = torch.randn(6, 3, 3, 3)
    bn = {"weight": torch.rand(6), "bias": torch.randn(6), "running_mean": torch.randn(6), "running_var": torch.rand(6)}
    slot.inflate_from_2d(w2d, bn)
    for sub in slot.op_set.subkernels:
        torch.testing.assert_close(slot.op_weight(sub), inflate_2d(w2d, sub))


def test_full_kernel_warmup_runs_the_full_kernel_on_every_channel():
    torch.manual_seed(0)
    slot = perf_slot(op_set="c123d", width=6, shared_kernel=True)
    x = torch.randn(2, 3, 4, 5, 5)
    slot.sampler.full_kernel = True
    for training in (True, False):
        slot.train(training)
        ref = torch.nn.functional.conv3d(x, slot.candidates.weights["3x3x3"], padding=1)
        bn = slot.norm
        entries = slice(0, 6)  # op 0 (3x3x3) of every channel
        ref = torch.nn.functional.batch_norm(
            ref,
            bn.running_mean[entries].clone(),
            bn.running_var[entries].clone(),
            bn.weight[entries],
            bn.bias[entries],
            training,
            0.0,
            bn.eps,
        )
        torch.testing.assert_close(slot(x), ref, atol=1e-5, rtol=1e-5)
    slot.sampler.full_kernel = False
    slot.train()
    assert not torch.equal(slot(x), slot(x))  # sampling again


@pytest.mark.parametrize(
    "op_set, shared, message",
    [
        ("c123d", False, r"shared_kernel=true.*layer 'l' \(op set c123d, shared_kernel=False\)"),
        ("c12d", True, r"full kernel \(3x3x3\) in the op set.*op set c12d"),
    ],
)
def test_full_kernel_warmup_needs_a_shared_full_kernel(op_set, shared, message):
    from types import SimpleNamespace

    from cakes.callbacks.supernet import SupernetCallback

    module = nn.Sequential(perf_slot(op_set=op_set, shared_kernel=shared))
    with pytest.raises(ValueError, match=message):
        SupernetCallback(full_kernel_epochs=2).on_fit_start(SimpleNamespace(current_epoch=0), module)
    SupernetCallback(full_kernel_epochs=0).on_fit_start(SimpleNamespace(current_epoch=0), module)  # off: fine


def test_cost_slot_full_kernel_warmup_trains_only_the_full_paths():
    """During the warm-up a cost-priority slot's other paths carry nothing (their conv output is
    zeroed before the norm, so neither input nor weights reach them) and the lasso waits."""
    from types import SimpleNamespace

    from cakes.callbacks.supernet import SupernetCallback

    torch.manual_seed(0)
    slot = cost_slot(op_set="c123d", width=4)
    net = nn.Sequential(slot)
    callback = SupernetCallback(lasso=1e-2, full_kernel_epochs=2)
    callback.on_fit_start(SimpleNamespace(current_epoch=0), net)
    assert slot.full_kernel and callback.warming_up
    x = torch.randn(2, 3, 4, 5, 5)
    out = slot(x)
    reference = slot.norm(torch.cat([slot.candidates(x)[:, :4], torch.zeros(2, 8, 4, 5, 5)], dim=1))
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    weights = slot.candidates.weights
    assert weights["1x3x3"].grad.abs().sum() == 0 and weights["3x3x3"].grad.abs().sum() > 0
    gamma_grad = slot.norm.weight.grad.clone()
    callback.on_before_optimizer_step(None, net, None)
    assert torch.equal(slot.norm.weight.grad, gamma_grad)  # no lasso while warming up
    callback.on_train_batch_start(SimpleNamespace(current_epoch=2, global_rank=0), net, None, 0)
    assert not slot.full_kernel
    callback.on_before_optimizer_step(None, net, None)
    assert not torch.equal(slot.norm.weight.grad, gamma_grad)  # lasso after it
    with pytest.raises(ValueError, match=r"full kernel \(3x3x3\) in the op set.*layer 'l' \(op set c12d\)"):
        SupernetCallback(full_kernel_epochs=1).on_fit_start(
            SimpleNamespace(current_epoch=0), nn.Sequential(cost_slot("c12d"))
        )
