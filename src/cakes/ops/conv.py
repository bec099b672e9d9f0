"""``CakesConv3d``: the derived (retrain-time) heterogeneous 3D convolution.

Each output channel uses its own sub-kernel of a ``k×k×k`` kernel. Channels are grouped by
sub-kernel in the order the ``counts`` mapping lists them, and every group runs as one dense
convolution over all input channels; outputs are concatenated along channels::

    x (N, C_in, T, H, W) ─┬─ conv 3x3x3 → (N, n_3x3x3, T', H', W') ─┐
                          ├─ conv 1x3x3 → (N, n_1x3x3, T', H', W') ─┼─ concat → (N, C_out, T', H', W')
                          └─ conv 3x1x1 → (N, n_3x1x1, T', H', W') ─┘

Semantics: ``F.conv3d(x, op.to_dense(), stride=stride, padding=k // 2) == op(x)``. Which of the
equivalent executions runs (these groups fused, per group, or that one dense conv) is chosen per
layer by :mod:`cakes.ops.plan`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cakes.ops import plan
from cakes.ops.fold import fold_into_rows
from cakes.ops.inflate import inflate_2d_grouped
from cakes.ops.reference import dense_weight
from cakes.ops.subkernel import Stride, SubKernel, as_triple, parse_counts


class CakesConv3d(nn.Module):
    """Heterogeneous 3D convolution with one sub-kernel per output channel.

    Args:
        in_channels: input channels, read by every group.
        counts: ordered mapping ``sub-kernel name -> output channels``, e.g.
            ``{"3x3x3": 28, "1x3x3": 35, "3x1x1": 1}``; zero counts are allowed and skipped.
        stride: int or (T, H, W) stride, shared by all groups.
        bias: add a learnable bias per output channel.
        kernel_size: the full kernel size ``k`` (sub-kernel axes are 1 or k).

    Shapes: ``(N, in_channels, T, H, W) -> (N, out_channels, T', H', W')`` with
    ``out_channels = sum(counts.values())`` and ``T' = ceil(T / stride_T)`` etc.
    """

    def __init__(
        self,
        in_channels: int,
        counts: Mapping[str, int],
        stride: Stride = 1,
        bias: bool = False,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        parsed = parse_counts(counts, kernel_size, where="CakesConv3d counts")
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        self.stride = as_triple(stride)
        #: every listed entry, zero counts included, in order (what ``counts`` returns)
        self._all_counts = [(sub.name, n) for sub, n in parsed]
        self.subkernels: list[SubKernel] = [sub for sub, n in parsed if n > 0]
        self.group_sizes: list[int] = [n for _, n in parsed if n > 0]
        self.out_channels = sum(self.group_sizes)
        self.weights = nn.ParameterDict(
            {
                sub.name: nn.Parameter(torch.empty(n, in_channels, *sub.size))
                for sub, n in zip(self.subkernels, self.group_sizes, strict=True)
            }
        )
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        self.reset_parameters()

    @property
    def counts(self) -> dict[str, int]:
        """The ``{sub-kernel: channels}`` mapping this op was built from (zero entries kept)."""
        return dict(self._all_counts)

    def reset_parameters(self) -> None:
        """Kaiming-uniform per group as ``nn.Conv3d`` does, with the group's own fan-in."""
        for weight in self.weights.values():
            nn.init.kaiming_uniform_(weight, a=5**0.5)
        if self.bias is not None:
            fan_in = self.in_channels * max(s.volume for s in self.subkernels)
            bound = 1 / fan_in**0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, T, H, W) -> (N, C_out, T', H', W')``."""
        weights = [self.weights[sub.name] for sub in self.subkernels]
        return plan.run(x, weights, self.subkernels, self.stride, self.bias, self.kernel_size)

    @classmethod
    def from_dense(
        cls, weight: Tensor, counts: Mapping[str, int], stride: Stride = 1, bias: Tensor | None = None
    ) -> CakesConv3d:
        """Shrink a dense ``(out, in, k, k, k)`` weight: each group takes the centred sub-kernel
        slice of its contiguous rows (rows in ``counts`` order)."""
        if weight.dim() != 5 or not (weight.shape[2] == weight.shape[3] == weight.shape[4]):
            raise ValueError(f"from_dense expects a (out, in, k, k, k) weight, got shape {tuple(weight.shape)}")
        k = weight.shape[2]
        op = cls(weight.shape[1], counts, stride=stride, bias=bias is not None, kernel_size=k)
        if op.out_channels != weight.shape[0]:
            raise ValueError(
                f"from_dense: counts {op.counts} sum to {op.out_channels} but the weight has {weight.shape[0]} rows"
            )
        with torch.no_grad():
            start = 0
            for sub, n in zip(op.subkernels, op.group_sizes, strict=True):
                op.weights[sub.name].copy_(weight[start : start + n][(slice(None), slice(None), *sub.centre_slice)])
                start += n
            if bias is not None:
                op.bias.copy_(bias)  # type: ignore[union-attr]
        return op

    def inflate_from_2d(self, weight: Tensor) -> list[str]:
        """ImageNet initialisation: the 2D ``(out, in, k, k)`` rows are split into contiguous groups
        in ``counts`` order and each group is inflated into its sub-kernel."""
        inflated = inflate_2d_grouped(weight, self.counts)
        with torch.no_grad():
            for name, w in inflated.items():
                if w.shape != self.weights[name].shape:
                    raise ValueError(
                        f"2D weight {tuple(weight.shape)} does not fit group {name} {tuple(self.weights[name].shape)}"
                    )
                self.weights[name].copy_(w)
        return [f"weights.{name}" for name in inflated]

    def fold_output_affine(self, scale: Tensor, shift: Tensor) -> None:
        """Make this op return ``scale·op(x) + shift`` per output channel (``(C_out,)`` each, in
        output-channel order): its groups' rows scaled, a bias added or updated (in place;
        :func:`cakes.ops.fold.fold_batch_norms`)."""
        fold_into_rows(self, [self.weights[sub.name] for sub in self.subkernels], scale, shift)

    def to_dense(self) -> Tensor:
        """The equivalent zero-padded ``(out, in, k, k, k)`` weight (differentiable)."""
        return dense_weight([self.weights[sub.name] for sub in self.subkernels], self.subkernels, self.kernel_size)

    def extra_repr(self) -> str:
        counts = ", ".join(f"{n}: {c}" for n, c in self._all_counts)
        return f"{self.in_channels}, {{{counts}}}, stride={self.stride}, bias={self.bias is not None}"
