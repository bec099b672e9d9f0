"""The fast path's autograd Function and :func:`cakes_conv3d`, which runs it where it applies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cakes.ops.cpu.backward import BackwardPass
from cakes.ops.cpu.forward import fast_forward, layout_weights
from cakes.ops.cpu.layout import CHANNELS_LAST
from cakes.ops.cpu.switch import fast_path_applies
from cakes.ops.reference import grouped_conv3d
from cakes.ops.subkernel import Stride, SubKernel, as_triple


def cakes_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: Stride,
    bias: Tensor | None = None,
    out_index: Tensor | None = None,
) -> Tensor:
    """``cat([subkernel_conv(x, w, sub, stride) for w, sub in zip(weights, subs)], 1) + bias``.

    ``x``: ``(N, C_in, T, H, W)``; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``; output
    ``(N, C_out, T', H', W')``, channels in group order, or, with ``out_index`` (a ``(C_out,)``
    permutation), row ``r`` of the group order at output channel ``out_index[r]`` (``bias`` is per
    output channel). Runs the CPU fast path (:class:`CakesConvCPU`; no-grad calls its forward alone)
    where :func:`~cakes.ops.cpu.switch.fast_path_applies`, else the reference
    :func:`~cakes.ops.reference.grouped_conv3d`; same values and gradients. On the fast path the rows
    are written to (and their gradients read from) their channels directly, so the permutation costs
    no extra pass.
    """
    stride = as_triple(stride)
    subs = tuple(subs)
    if not fast_path_applies(x, weights, bias):
        return grouped_conv3d(x, weights, subs, stride, bias, out_index)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=CHANNELS_LAST)):
        x = x.contiguous()
    tensors = (x, bias, *weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return CakesConvCPU.apply(x, bias, subs, stride, out_index, *weights)
    return fast_forward(x, list(weights), subs, stride, bias, out_index)[0]


class CakesConvCPU(torch.autograd.Function):
    """The whole heterogeneous convolution as one autograd node (CPU fast path)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        bias: Tensor | None,
        subs: tuple[SubKernel, ...],
        stride: tuple[int, int, int],
        out_index: Tensor | None,
        *weights: Tensor,
    ) -> Tensor:
        """``(N, C_in, T, H, W) -> (N, C_out, T', H', W')`` (see :func:`cakes_conv3d`)."""
        ctx.subs, ctx.stride, ctx.has_bias = subs, stride, bias is not None
        ctx.save_for_backward(x, bias, out_index, *weights)
        # computed without autograd: kept on ctx (not inputs or outputs), reused by backward
        ctx.layout_weights = layout_weights(x, weights, subs, stride)
        y, ctx.unit_weights = fast_forward(x, ctx.layout_weights, subs, stride, bias, out_index)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        """Gradients of ``x``, ``bias`` and every weight for the output gradient ``gy``
        ``(N, C_out, T', H', W')``; ``None`` for the non-tensor arguments."""
        x, bias, out_index, *weights = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[5:]
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, gy, need_x, need_b, need_w)
        gx, gws = BackwardPass(
            gy, x, out_index, weights, ctx.subs, ctx.stride, ctx.layout_weights, ctx.unit_weights, need_x, need_w
        ).run()
        gb = gy.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
        return gx, gb, None, None, None, *gws


def _differentiable_backward(
    ctx, gy: Tensor, need_x: bool, need_b: bool, need_w: Sequence[bool]
) -> tuple[Tensor | None, ...]:
    """``create_graph=True`` (double backward): the gradients of the reference form, differentiable."""
    x, bias, out_index, *weights = ctx.saved_tensors
    inputs = [t for t, need in zip([x, bias, *weights], [need_x, need_b, *need_w], strict=True) if need]
    y = grouped_conv3d(x, weights, ctx.subs, ctx.stride, bias, out_index)
    grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True))
    return (
        next(grads) if need_x else None,
        next(grads) if need_b else None,
        None,
        None,
        None,
        *(next(grads) if need else None for need in need_w),
    )
