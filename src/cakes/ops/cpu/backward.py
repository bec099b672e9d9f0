"""Backward kernels of the CPU fast path: input and weight gradients of every unit, in named steps.

oneDNN's backward-data is much faster channels-last: where oneDNN runs (float32), the input gradient
is computed per group into one channels-last accumulator (for ``NCDHW`` inputs transposed back once
at the end). At stride 1, every group after the first adds its input gradient in place as a forward
convolution of its output-gradient rows with the flipped, transposed kernel (a binary post-op: no
gradient tensor per group, no sum); ``kx1x1`` groups join it there, else run as matrix products.
Weight gradients are computed per unit (block fill as in the forward), in the input's layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cakes.ops.cpu import torch_shim
from cakes.ops.cpu.layout import (
    CHANNELS_LAST,
    is_channels_last,
    memory_format_of,
    read_rows,
    to_memory_format,
    uses_onednn,
)
from cakes.ops.cpu.matmul import matmul_backward, spatial_sample
from cakes.ops.cpu.units import Unit, plan_units, scatter_weight_grad
from cakes.ops.cpu.views import ConvView
from cakes.ops.subkernel import SubKernel


def accumulate_input_grad(
    gx: Tensor | None, gy_rows: Tensor, w: Tensor, sub: SubKernel, stride: tuple[int, int, int], like: Tensor
) -> Tensor:
    """``gx +`` the input gradient of one group's convolution (weight ``w``: ``(n, C_in, *sub.size)``),
    ``gx`` updated in place; ``None``: a new tensor.

    ``gy_rows``: ``(N, n, T', H', W')`` channels-last (a channel slice of the whole output gradient is
    fine); ``gx`` and ``like`` (only its shape is read): ``(N, C_in, T, H, W)`` channels-last. At
    stride 1 after the first group, the input gradient is the forward convolution of ``gy_rows``
    with the flipped, transposed kernel (odd sizes: the same padding), which oneDNN adds into ``gx``
    as a binary post-op — no gradient tensor per group, no separate sum; otherwise it comes from
    ``convolution_backward`` (and is summed). Same values either way."""
    view = ConvView.of(sub, stride, like)
    if gx is None or stride != (1, 1, 1) or torch_shim.convolution_add_ is None:
        gi = view.backward(gy_rows, like, w, need_x=True, need_w=False)[0]
        return gi if gx is None else gx.add_(gi)
    w_t = view.weight(w.transpose(0, 1).flip(2, 3, 4))  # one copy; oneDNN reorders weights anyway
    torch_shim.convolution_add_(view.view(gx), view.view(gy_rows), w_t, view.padding)
    return gx


class OutputGradRows:
    """Rows ``[start, stop)`` (group order) of the output gradient ``(N, C_out, T', H', W')``, gathered
    through ``out_index`` when given, each copied at most once."""

    def __init__(self, gy: Tensor, out_index: Tensor | None) -> None:
        self.gy, self.out_index = gy, out_index
        self.cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, start: int, stop: int, fmt: torch.memory_format | None = None) -> Tensor:
        """The rows, made contiguous in ``fmt`` if given (``None``: as they are)."""
        key = (start, stop)
        rows = self.cache[key] if key in self.cache else read_rows(self.gy, start, stop, self.out_index)
        self.cache[key] = rows if fmt is None else rows.contiguous(memory_format=fmt)
        return self.cache[key]


class BackwardPass:
    """Input and weight gradients of one fast-path forward (first-order backward).

    ``gy``: ``(N, C_out, T', H', W')``; ``x``: ``(N, C_in, T, H, W)``; ``weights[j]``:
    ``(n_j, C_in, *subs[j].size)``; ``layout_weights`` / ``unit_weights``: the forward's weights in
    ``x``'s layout and per unit (reused). :meth:`run` returns ``(gx or None, [gw_j or None])``."""

    def __init__(
        self,
        gy: Tensor,
        x: Tensor,
        out_index: Tensor | None,
        weights: Sequence[Tensor],
        subs: tuple[SubKernel, ...],
        stride: tuple[int, int, int],
        layout_weights: list[Tensor],
        unit_weights: dict[Unit, Tensor],
        need_x: bool,
        need_w: Sequence[bool],
    ) -> None:
        self.gy, self.x, self.out_index, self.weights, self.subs, self.stride = gy, x, out_index, weights, subs, stride
        self.layout_weights, self.unit_weights = layout_weights, unit_weights
        self.need_x, self.need_w = need_x, need_w
        self.fmt = memory_format_of(x)
        self.groups = plan_units(subs, [w.shape[0] for w in weights], stride, 0)
        self.rows = OutputGradRows(gy, out_index)
        #: the input gradient runs channels-last per group (oneDNN); else with the weight gradients
        self.channels_last_data = need_x and uses_onednn(x)
        #: ... and accumulates in place (kx1x1 groups included)
        self.fused_data = self.channels_last_data and stride == (1, 1, 1) and torch_shim.convolution_add_ is not None
        #: weight-gradient units: the forward's (block fill) when the data gradient runs apart, else the groups
        self.units = list(unit_weights) if self.channels_last_data else self.groups
        self.gx: Tensor | None = None
        self.gws: list[Tensor | None] = [None] * len(weights)

    def run(self) -> tuple[Tensor | None, list[Tensor | None]]:
        """``(gx, gws)``: the input gradient in ``x``'s layout (``None`` when not needed), the per-group
        weight gradients."""
        if self.channels_last_data:
            self._channels_last_input_grad()
        self._convolution_grads()
        self._matmul_grads()
        if not self.need_x:
            return None, self.gws
        gx = torch.zeros_like(self.x) if self.gx is None else to_memory_format(self.gx, self.fmt)
        return gx, self.gws

    def _channels_last_input_grad(self) -> None:
        """Per group into one channels-last accumulator (``kx1x1`` groups only where it adds in place)."""
        x = self.x
        # backward-data reads only the input's shape and layout (channels-last), never its values
        like = (
            x
            if self.fmt is CHANNELS_LAST
            else torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
        )
        for g in self.groups:
            if g.matmul and not self.fused_data:
                continue
            # a channels-last gradient's channels are read in place (oneDNN takes the strides)
            in_place = is_channels_last(self.gy) and self.fused_data
            gy_g = self.rows(g.start, g.stop, None if in_place else CHANNELS_LAST)
            self.gx = accumulate_input_grad(self.gx, gy_g, self.layout_weights[g.parts[0][0]], g.sub, self.stride, like)

    def _convolution_grads(self) -> None:
        """Weight gradients of the convolution units (and their input gradients unless computed channels-last)."""
        want_x = self.need_x and not self.channels_last_data
        for u in self.units:
            if u.matmul:
                continue
            want_w = any(self.need_w[j] for j, _, _ in u.parts)
            if not (want_x or want_w):
                continue
            w = self.unit_weights[u] if u in self.unit_weights else self.layout_weights[u.parts[0][0]]
            gy_u = self.rows(u.start, u.stop, self.fmt)  # oneDNN copies a gradient slice into a dense tensor anyway
            gi, gw = ConvView.of(u.sub, self.stride, self.x).backward(gy_u, self.x, w, want_x, want_w)
            if want_x:
                self.gx = gi if self.gx is None else self.gx.add_(gi)
            if want_w:
                scatter_weight_grad(u, gw, self.weights, self.subs, self.gws, self.need_w)

    def _sampled_input_grad(self) -> Tensor:
        """The buffer matrix-product input gradients accumulate into: ``gx`` itself (created if needed) or,
        at spatial stride, a zero ``(N, C_in, T, H', W')`` one added into ``gx`` afterwards."""
        if self.gx is None:
            self.gx = torch.zeros_like(self.x, memory_format=self.fmt)
        elif not (self.gx.is_contiguous() or self.gx.is_contiguous(memory_format=CHANNELS_LAST)):
            self.gx = self.gx.contiguous(memory_format=self.fmt)
        if self.stride[1] > 1 or self.stride[2] > 1:
            sampled = self.gx[:, :, :, :: self.stride[1], :: self.stride[2]]
            return torch.zeros_like(sampled, memory_format=memory_format_of(self.gx))
        return self.gx

    def _matmul_grads(self) -> None:
        """Input and weight gradients of the ``kx1x1`` units still due, as shifted matrix products."""
        matmul_x = [g for g in self.groups if g.matmul] if self.need_x and not self.fused_data else []
        matmul_w = [u for u in self.units if u.matmul and self.need_w[u.parts[0][0]]]
        if not (matmul_x or matmul_w):
            return
        gy_m = self.gy.contiguous(memory_format=self.fmt)

        def rows(a: int, b: int) -> tuple[Tensor, int, int]:  # output-gradient rows [a, b) of a unit
            return (gy_m, a, b) if self.out_index is None else (self.rows(a, b, self.fmt), 0, b - a)

        x_s = spatial_sample(self.x, self.stride) if matmul_w else None
        gx_s = self._sampled_input_grad() if matmul_x else None
        both = not self.channels_last_data  # the same partition: one pass over the taps for both gradients
        for g in matmul_x:
            j = g.parts[0][0]
            x_w = x_s if both and self.need_w[j] else None
            gw = matmul_backward(*rows(g.start, g.stop), x_w, self.weights[j], g.sub, gx_s)
            if gw is not None:
                scatter_weight_grad(g, gw, self.weights, self.subs, self.gws, self.need_w)
        for u in matmul_w:
            if both and matmul_x:
                continue
            j, lo, hi = u.parts[0]
            gw = matmul_backward(*rows(u.start, u.stop), x_s, self.weights[j][lo:hi], u.sub, None)
            scatter_weight_grad(u, gw, self.weights, self.subs, self.gws, self.need_w)
        if gx_s is not None and gx_s is not self.gx:
            self.gx[:, :, :, :: self.stride[1], :: self.stride[2]] += gx_s
