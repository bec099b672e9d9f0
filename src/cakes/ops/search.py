"""Search-time operators (supernet slots) and their factories; separate from the derived
:class:`~cakes.ops.conv.CakesConv3d` they export to.

Both slots hold every candidate sub-kernel with the full ``C_out`` outputs (one
:class:`CakesConv3d` whose counts are all ``C_out``) and ONE norm over the ``n·C_out`` (op, channel)
pairs, whose ``|γ|`` are the path weights. Entry ``k·C_out + c`` belongs to op ``k``, channel ``c``.

* :class:`CostPrioritySlot` runs all candidates in parallel and emits all ``n·C_out`` channels;
  the next conv aggregates them. A cost-weighted L1 on ``γ`` (:func:`cakes.callbacks.supernet.apply_lasso`,
  driven by :class:`cakes.callbacks.SupernetCallback`) makes expensive paths pay.
* :class:`PerformancePrioritySlot` samples, each training step, ``C_out`` of the pairs and computes
  only those (sliced weights, sliced norm with its running statistics written back), emitting
  ``C_out`` channels. In eval mode it runs its current selection (by the selection rule).

A *selection* is a list of ``C_out`` pairs in output order: ``ops[j]``, ``channels[j]``.
Rules: ``layer_topk`` (the authors' code: the top ``C_out`` |γ| of the layer, counts only, pairs
in op-major order) and ``channel_argmax`` (the paper's wording: per output channel, the op with
the largest |γ|; output position = channel).

Eval consistency: the next conv learns what each output position carries in training, so eval
must put its pairs where the sampler puts them. Every sampling mode has one *layout* — output
position = channel (``per_channel``) or = rank in op-major order (``pair_subset``,
``split_uniform``) — and only the selection rule of the same layout is accepted
(:func:`eval_selection`); ``auto`` picks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cakes.ops.conv import CakesConv3d
from cakes.ops.cpu.function import cakes_conv3d
from cakes.ops.factory import ConvNorm, NormFactory, OperatorFactory
from cakes.ops.inflate import marginal
from cakes.ops.subkernel import OpSet, Stride, SubKernel, resolve_op_set

SELECTION_RULES = ("layer_topk", "channel_argmax")
SAMPLING_MODES = ("per_channel", "pair_subset", "split_uniform")
COST_KINDS = ("volume", "macs", "uniform", "latency")
#: where a sampled or selected pair lands: ``channel`` (output position = its channel) or
#: ``op_major`` (its rank among the layer's pairs sorted by op, then channel)
SAMPLING_LAYOUT = {"per_channel": "channel", "pair_subset": "op_major", "split_uniform": "op_major"}
SELECTION_LAYOUT = {"channel_argmax": "channel", "layer_topk": "op_major"}
#: the authors' op-set-dependent sampling (``sampling: authors``): 2,3D split uniformly, else pair subsets
AUTHORS_SAMPLING = {("3x3x3", "1x3x3"): "split_uniform"}


def resolve_sampling(sampling: str, op_set: OpSet) -> str:
    """``authors`` → what the authors' code draws for ``op_set``; other modes are checked and kept."""
    if sampling == "authors":
        return AUTHORS_SAMPLING.get(tuple(op_set.names), "pair_subset")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"search.sampling must be one of {SAMPLING_MODES} or 'authors', got {sampling!r}")
    if sampling == "split_uniform" and len(op_set) != 2:
        raise ValueError(
            f"search.sampling=split_uniform splits a layer between two ops; op set {op_set.name} has "
            f"{len(op_set)} ({', '.join(op_set.names)})"
        )
    return sampling


def eval_selection(sampling: str, selection: str = "auto") -> str:
    """The selection rule a performance-priority slot evaluates and exports with under ``sampling``:
    the rule whose layout is the sampler's (``auto``), or ``selection`` if it is that rule."""
    consistent = next(rule for rule, layout in SELECTION_LAYOUT.items() if layout == SAMPLING_LAYOUT[sampling])
    if selection == "auto":
        return consistent
    if selection not in SELECTION_RULES:
        raise ValueError(f"search.selection must be one of {SELECTION_RULES} or 'auto', got {selection!r}")
    if selection != consistent:
        raise ValueError(
            f"search.selection={selection} does not fit search.sampling={sampling}: training puts each sampled pair "
            f"at output position = {SAMPLING_LAYOUT[sampling].replace('_', '-')} order, {selection} at "
            f"{SELECTION_LAYOUT[selection].replace('_', '-')} order, so in eval the next conv would read permuted "
            f"channels. Use search.selection={consistent} (or auto)"
        )
    return selection


def cost_shares(op_set: OpSet, cost: str | Mapping[str, float] = "volume") -> list[float]:
    """Per-op lasso weights ``w_k``: the op's share of the layer's cost.

    ``"volume"``: kernel volume shares (27:9:3 → 9/13, 3/13, 1/13; 27:9 → 3/4, 1/4). Within one
    layer every candidate has the same fan-in and output resolution, so MACs shares are the same
    numbers; ``"macs"`` additionally scales each layer by its MACs (see :func:`calibrate_macs_costs`).
    ``"uniform"``: every op weight 1, so every path pays the same ``s`` (the authors' lasso without
    their reweight flag). A mapping ``{sub-kernel: measured latency}`` gives latency shares.
    """
    if isinstance(cost, Mapping):
        missing = [n for n in op_set.names if n not in cost]
        if missing:
            raise ValueError(f"latency table {dict(cost)} has no entry for {missing} (op set {op_set.name})")
        raw = [float(cost[n]) for n in op_set.names]
        if any(v <= 0 for v in raw):
            raise ValueError(f"latency table entries must be positive, got {dict(cost)}")
    elif cost == "uniform":
        return [1.0] * len(op_set)
    elif cost in ("volume", "macs"):
        raw = [float(sub.volume) for sub in op_set]
    else:
        raise ValueError(f"search cost must be one of {COST_KINDS[:3]} or a latency table mapping, got {cost!r}")
    total = sum(raw)
    return [v / total for v in raw]


class SearchSlot(nn.Module):
    """Common state of a supernet slot: candidates, path-weight norm, selection, export."""

    search_mode: str = ""
    #: the selection rule used when none is named (export, eval)
    selection: str = "layer_topk"

    def __init__(
        self,
        *,
        layer: str,
        in_channels: int,
        out_channels: int,
        op_set: OpSet,
        norm: NormFactory,
        stride: Stride,
        shared_kernel: bool = False,
    ) -> None:
        super().__init__()
        self.layer, self.op_set = layer, op_set
        self.in_channels, self.width = in_channels, out_channels
        #: one full kernel per channel whose marginals are the ops (:func:`~cakes.ops.inflate.marginal`)
        #: instead of independent weights per op
        self.shared_kernel = bool(shared_kernel)
        if self.shared_kernel:
            enclosing = "x".join(str(max(sub.size[axis] for sub in op_set)) for axis in range(3))
            self.candidates = CakesConv3d(in_channels, {enclosing: out_channels}, stride=stride)
        else:
            self.candidates = CakesConv3d(in_channels, {name: out_channels for name in op_set.names}, stride=stride)
        self.norm = norm(len(op_set) * out_channels)
        if not hasattr(self.norm, "weight") or self.norm.weight is None:
            raise ValueError(f"layer {layer!r}: the slot's norm needs an affine weight (the path weights γ)")

    @property
    def num_ops(self) -> int:
        return len(self.op_set)

    def op_weight(self, sub: SubKernel) -> Tensor:
        """Op ``sub``'s ``(C_out, C_in, *sub.size)`` kernels: its own weights, or the marginal of the
        shared kernel."""
        if self.shared_kernel:
            return marginal(next(iter(self.candidates.weights.values())), sub)
        return self.candidates.weights[sub.name]

    def path_weights(self) -> Tensor:
        """``|γ|`` as ``(n_ops, C_out)``."""
        return self.norm.weight.detach().abs().view(self.num_ops, self.width)

    def select(self, rule: str) -> tuple[Tensor, Tensor]:
        """The selection ``(ops, channels)``, each ``(C_out,)`` long, in output order."""
        weights = self.path_weights()
        if rule == "layer_topk":
            entries = torch.topk(weights.flatten(), self.width, sorted=False).indices.sort().values
            return entries // self.width, entries % self.width
        if rule == "channel_argmax":
            return weights.argmax(dim=0), torch.arange(self.width, device=weights.device)
        raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {rule!r}")

    def counts(self, rule: str | None = None) -> dict[str, int]:
        """Channels per sub-kernel under ``rule`` (default: the slot's own; op-set order; zeros kept)."""
        ops, _ = self.select(rule or self.selection)
        per_op = torch.bincount(ops.cpu(), minlength=self.num_ops).tolist()
        return dict(zip(self.op_set.names, per_op, strict=True))

    def inflate_from_2d(self, weight: Tensor, norm_state: Mapping[str, Tensor]) -> list[str]:
        """Supernet ImageNet init: every candidate from all ``C_out`` rows; the BN repeated per op."""
        # shared: the full kernel inflated, whose marginals are exactly each op's inflation
        loaded = self.candidates.inflate_from_2d(weight if self.shared_kernel else weight.repeat(self.num_ops, 1, 1, 1))
        self.norm.load_state_dict({k: v.repeat(self.num_ops) for k, v in norm_state.items()})
        return [f"candidates.{n}" for n in loaded] + [f"norm.{k}" for k in norm_state]

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, op_set={self.op_set.name}, width={self.width}"


class CostPrioritySlot(SearchSlot):
    """All candidates in parallel → norm over ``n·C_out``.

    ``(N, C_in, T, H, W) -> (N, n·C_out, T', H', W')``; the next conv aggregates.
    ``cost_weights`` (buffer, ``(n·C_out,)``) holds each path's lasso weight ``w_k``.
    """

    search_mode = "cost"

    def __init__(self, *, cost: str | Mapping[str, float] = "volume", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cost = cost
        shares = torch.tensor(cost_shares(self.op_set, cost))
        self.register_buffer("cost_weights", shares.repeat_interleave(self.width))
        self.out_channels = self.num_ops * self.width
        #: set by :class:`~cakes.callbacks.SupernetCallback` during its full-kernel warm-up: only
        #: the full kernel's path carries a signal (the other paths' conv outputs are zeroed)
        self.full_kernel = False

    @property
    def full_op(self) -> int | None:
        """Index of the full ``k×k×k`` op in the op set (``None`` if the set lacks it)."""
        k = self.candidates.kernel_size
        return self.op_set.names.index(f"{k}x{k}x{k}") if f"{k}x{k}x{k}" in self.op_set.names else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.candidates(x)
        if self.full_kernel:
            if self.full_op is None:
                raise ValueError(
                    f"layer {self.layer!r}: the full-kernel warm-up needs the full kernel in the op set, "
                    f"got op set {self.op_set.name}"
                )
            keep = torch.zeros(self.num_ops, self.width, dtype=y.dtype, device=y.device)
            keep[self.full_op] = 1
            y = y * keep.view(1, -1, 1, 1, 1)
        return self.norm(y)


class ChannelSampler:
    """Draws the pairs a performance-priority slot computes at a training step.

    ``per_channel`` (the paper): each output channel picks one op uniformly; position = channel.
    ``pair_subset`` (the authors' 1,2D and 1,2,3D code): a uniform subset of ``C_out`` of the
    ``n·C_out`` pairs, in op-major order. ``split_uniform`` (the authors' 2,3D code, two ops): the
    first op's count ``m`` uniform in ``0..C_out``, a uniform subset of ``m`` of its channels and of
    ``C_out − m`` of the second op's, in op-major order. One generator (CPU) is shared by all slots
    of a network; reseed it per DDP rank with :meth:`seed`; its state goes into checkpoints.
    """

    def __init__(self, mode: str = "per_channel", seed: int = 0) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
        self.mode = mode
        #: set by :class:`~cakes.callbacks.SupernetCallback` during its full-kernel warm-up: every
        #: slot then runs its full (shared) kernel on every channel, in training and in eval
        self.full_kernel = False
        self.generator = torch.Generator()
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def __getstate__(self) -> dict[str, Any]:  # torch.Generator does not pickle (ddp_spawn, deepcopy)
        return {"mode": self.mode, "full_kernel": self.full_kernel, "state": self.generator.get_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.mode = state["mode"]
        self.full_kernel = state.get("full_kernel", False)
        self.generator = torch.Generator()
        self.generator.set_state(state["state"])

    def sample(self, num_ops: int, width: int) -> tuple[Tensor, Tensor]:
        """``(ops, channels)``, each ``(width,)``: output position ``j`` computes op ``ops[j]`` of
        channel ``channels[j]``."""
        if self.mode == "per_channel":
            ops = torch.randint(num_ops, (width,), generator=self.generator)
            return ops, torch.arange(width)
        if self.mode == "split_uniform":
            first = int(torch.randint(width + 1, (1,), generator=self.generator))
            kept = [torch.randperm(width, generator=self.generator)[:n].sort().values for n in (first, width - first)]
            ops = torch.cat([torch.full((first,), 0), torch.full((width - first,), 1)])
            return ops, torch.cat(kept)
        entries = torch.randperm(num_ops * width, generator=self.generator)[:width].sort().values
        return entries // width, entries % width


class PerformancePrioritySlot(SearchSlot):
    """Samples ``C_out`` (op, channel) pairs per training step and computes only those.

    ``(N, C_in, T, H, W) -> (N, C_out, T', H', W')``. In eval mode it runs :meth:`select` under
    ``selection`` (deterministic; the rule of the sampler's layout, see :func:`eval_selection`),
    which is what :meth:`derive` exports.
    """

    search_mode = "performance"

    def __init__(self, *, sampler: ChannelSampler, selection: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampler, self.selection = sampler, eval_selection(sampler.mode, selection)
        self.out_channels = self.width
        if not isinstance(self.norm, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            raise ValueError(
                f"layer {self.layer!r}: performance-priority slots slice a BatchNorm or InstanceNorm, "
                f"got {type(self.norm).__name__}"
            )

    @property
    def full_op(self) -> int | None:
        """Index of the op whose kernel is the shared full kernel (``None`` if the set lacks it)."""
        enclosing = self.candidates.subkernels[0].name
        return self.op_set.names.index(enclosing) if self.shared_kernel and enclosing in self.op_set.names else None

    def forward(self, x: Tensor) -> Tensor:
        if self.sampler.full_kernel:
            if self.full_op is None:
                raise ValueError(
                    f"layer {self.layer!r}: the full-kernel warm-up needs shared_kernel=true and the full "
                    f"kernel in the op set, got op set {self.op_set.name} "
                    f"(shared_kernel={self.shared_kernel})"
                )
            ops = torch.full((self.width,), self.full_op, dtype=torch.long)
            channels = torch.arange(self.width)
        elif self.training:
            ops, channels = self.sampler.sample(self.num_ops, self.width)
        else:
            ops, channels = self.select(self.selection)
        return self.run_pairs(x, ops.to(x.device), channels.to(x.device))

    def run_pairs(self, x: Tensor, ops: Tensor, channels: Tensor) -> Tensor:
        """Compute output position ``j`` as op ``ops[j]`` on channel ``channels[j]``, then the
        norm entries ``ops·C_out + channels`` (running statistics updated in place)."""
        weights, subs, positions = [], [], []
        for k, sub in enumerate(self.op_set.subkernels):
            pos = (ops == k).nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            weights.append(self.op_weight(sub).index_select(0, channels[pos]))
            subs.append(sub)
            positions.append(pos)
        order = torch.cat(positions)  # output position of each op-major row
        in_place = bool((order[1:] > order[:-1]).all())
        out = cakes_conv3d(x, weights, subs, self.candidates.stride, out_index=None if in_place else order)
        return self._sliced_norm(out, ops * self.width + channels)

    def _sliced_norm(self, x: Tensor, entries: Tensor) -> Tensor:
        bn = self.norm
        if isinstance(bn, nn.modules.instancenorm._InstanceNorm) and not bn.track_running_stats:
            return F.instance_norm(x, None, None, bn.weight[entries], bn.bias[entries], True, 0.0, bn.eps)
        use_batch_stats = self.training or not bn.track_running_stats
        mean = var = None
        if bn.track_running_stats:
            mean, var = bn.running_mean[entries], bn.running_var[entries]
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        out = F.batch_norm(x, mean, var, bn.weight[entries], bn.bias[entries], use_batch_stats, momentum, bn.eps)
        if self.training and bn.track_running_stats:
            with torch.no_grad():  # write the updated statistics back (indexing made copies)
                bn.running_mean.index_copy_(0, entries, mean)
                bn.running_var.index_copy_(0, entries, var)
        return out

    def derive(self, rule: str | None = None) -> tuple[ConvNorm, Tensor]:
        """The derived slot of the current selection and the channel order it emits:
        ``supernet_eval(x)[:, order] == derived(x)`` (the derived conv groups channels by op)."""
        ops, channels = self.select(rule or self.selection)
        counts = {name: int((ops == k).sum()) for k, name in enumerate(self.op_set.names)}
        conv = CakesConv3d(self.in_channels, counts, stride=self.candidates.stride)
        bn = type(self.norm)(
            self.width,
            eps=self.norm.eps,
            momentum=self.norm.momentum,
            affine=True,
            track_running_stats=self.norm.track_running_stats,
        )
        order = torch.cat([(ops == k).nonzero().squeeze(1) for k in range(self.num_ops)])
        entries = (ops * self.width + channels)[order]
        with torch.no_grad():
            for k, sub in enumerate(self.op_set.subkernels):
                rows = channels[order][ops[order] == k]
                if rows.numel():
                    conv.weights[sub.name].copy_(self.op_weight(sub)[rows])
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(self.norm, name, None) is not None:
                    getattr(bn, name).copy_(getattr(self.norm, name)[entries])
        return ConvNorm(conv, bn), order


# --- factories ------------------------------------------------------------------------------------
class CostPriority(OperatorFactory):
    """Every slot a :class:`CostPrioritySlot` over ``op_set`` with lasso weights by ``cost``."""

    search_mode = "cost"

    def __init__(self, op_set: str | Sequence[str] | Mapping[str, Any], cost: str | Mapping[str, float] = "volume"):
        self.op_set = resolve_op_set(op_set)
        if isinstance(cost, Mapping):
            cost = {str(k): float(v) for k, v in cost.items()}
        cost_shares(self.op_set, cost)  # validate now, before any layer is built
        self.cost = cost

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        return CostPrioritySlot(
            layer=layer,
            in_channels=in_channels,
            out_channels=out_channels,
            op_set=self.op_set,
            norm=norm,
            stride=stride,
            cost=self.cost,
        )


class PerformancePriority(OperatorFactory):
    """Every slot a :class:`PerformancePrioritySlot`, all sharing one :class:`ChannelSampler`."""

    search_mode = "performance"

    def __init__(
        self,
        op_set: str | Sequence[str] | Mapping[str, Any],
        sampling: str = "per_channel",
        selection: str = "auto",
        seed: int = 0,
        shared_kernel: bool = False,
    ) -> None:
        self.op_set = resolve_op_set(op_set)
        self.shared_kernel = bool(shared_kernel)
        self.sampler = ChannelSampler(resolve_sampling(sampling, self.op_set), seed)
        self.selection = eval_selection(self.sampler.mode, selection)  # checked before any layer is built

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        return PerformancePrioritySlot(
            layer=layer,
            in_channels=in_channels,
            out_channels=out_channels,
            op_set=self.op_set,
            norm=norm,
            stride=stride,
            sampler=self.sampler,
            selection=self.selection,
            shared_kernel=self.shared_kernel,
        )


def search_slots(module: nn.Module) -> list[SearchSlot]:
    """Every supernet slot of a network, in module order."""
    return [m for m in module.modules() if isinstance(m, SearchSlot)]


@torch.no_grad()
def calibrate_macs_costs(net: nn.Module, input_shape: Sequence[int]) -> None:
    """For ``cost: macs`` slots, scale each layer's volume shares by that layer's MACs per output
    channel at its real resolution (``C_in · Σ_k vol_k · output voxels``), normalised so the
    layers average 1 — expensive layers (high resolution, wide fan-in) pay more per path."""
    slots = [s for s in search_slots(net) if isinstance(s, CostPrioritySlot) and s.cost == "macs"]
    if not slots:
        return
    import copy

    shadow = copy.deepcopy(net).to("meta")
    voxels: dict[str, int] = {}
    hooks = [
        slot.register_forward_hook(lambda m, _i, out: voxels.__setitem__(m.layer, out[0, 0].numel()))
        for slot in search_slots(shadow)
    ]
    was_training = shadow.training
    shadow.eval()
    shadow(torch.zeros(1, *input_shape, device="meta"))
    shadow.train(was_training)
    for h in hooks:
        h.remove()
    per_layer = {s.layer: s.in_channels * sum(sub.volume for sub in s.op_set) * voxels[s.layer] for s in slots}
    mean = sum(per_layer.values()) / len(per_layer)
    for slot in slots:
        shares = torch.tensor(cost_shares(slot.op_set, "volume")) * (per_layer[slot.layer] / mean)
        slot.cost_weights.copy_(shares.repeat_interleave(slot.width).to(slot.cost_weights))
