"""Im2col execution: each group as one matrix product over its input patches (channels-last).

A convolution whose output has few positions and whose weight is large — ResNet-50 I3D's last stage,
512 channels at 8×4² after 8×112² clips, where a 3x3x3 weight is 28 MB and touched by only 128
output positions — is bound by its weight, not its MACs. PyTorch's CPU paths pay for it in weight
reorders and copies on every call: at batch 1 such an input goes to ``slow_conv3d`` (the
channels-last weight copied to NCDHW in the forward and twice more in the backward), at batch 2 to
oneDNN (the weight reordered to its blocked layout, forward and backward). Here the weight is used
where it lies: a channels-last ``(n, C_in, kT, kH, kW)`` weight is, byte for byte, an
``(n, kT·kH·kW·C_in)`` matrix, so with the input's patches gathered into a
``(positions, kT·kH·kW·C_in)`` matrix (taps outer, channels inner: the channels-last input read
as ``(N, T, H, W, C)``) the forward is one GEMM per group, and the backward two more (weight
gradient written in that same layout) and a scatter-add of the patch gradients.

The patch matrix holds ``kT·kH·kW`` copies of the input, so the execution is offered only while it
is at most :data:`MAX_PATCH_ELEMENTS` elements (:func:`supports`): small-spatial layers, where it
pays. MACs are exactly the groups'. Measured in docs/performance.md#im2col-for-weight-bound-layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from cakes.ops.cpu.layout import output_length
from cakes.ops.subkernel import SubKernel

#: the largest patch matrix (over all groups, in elements) the execution builds: 32 MiB of float32
MAX_PATCH_ELEMENTS = 1 << 23


def _output_size(shape: Sequence[int], stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """``(T', H', W')`` of an ``(N, C, T, H, W)`` input for odd sub-kernels padded by ``size // 2``."""
    return tuple(output_length(n, s) for n, s in zip(shape[2:], stride, strict=True))  # type: ignore[return-value]


def patch_elements(x: Tensor, subs: Sequence[SubKernel], stride: tuple[int, int, int]) -> int:
    """Elements of the patch matrices of ``x`` for these groups (one per distinct sub-kernel)."""
    positions = x.shape[0] * math.prod(_output_size(x.shape, stride))
    return sum(positions * sub.volume * x.shape[1] for sub in dict.fromkeys(subs))


def supports(x: Tensor, subs: Sequence[SubKernel], stride: tuple[int, int, int]) -> bool:
    """Whether :func:`im2col_conv3d` runs this call: a 5-D input whose patch matrices fit in
    :data:`MAX_PATCH_ELEMENTS`."""
    return x.dim() == 5 and patch_elements(x, subs, stride) <= MAX_PATCH_ELEMENTS


def _padded_frames(x: Tensor, sub: SubKernel) -> Tensor:
    """``x`` ``(N, C, T, H, W)`` as ``(N, T + 2p_T, H + 2p_H, W + 2p_W, C)``, zero-padded for ``sub``."""
    frames = x.permute(0, 2, 3, 4, 1)
    pt, ph, pw = sub.padding
    return F.pad(frames, (0, 0, pw, pw, ph, ph, pt, pt)) if pt or ph or pw else frames


def _patches(x: Tensor, sub: SubKernel, stride: tuple[int, int, int]) -> Tensor:
    """``(N·T'·H'·W', kT·kH·kW·C)``: row = output position, columns = its input patch, taps outer."""
    padded = _padded_frames(x, sub)
    for axis, (k, s) in enumerate(zip(sub.size, stride, strict=True), start=1):
        padded = padded.unfold(axis, k, s)  # (N, T', H', W', C, kT, kH, kW) after all three
    return padded.permute(0, 1, 2, 3, 5, 6, 7, 4).reshape(-1, sub.volume * x.shape[1])


def _weight_matrix(w: Tensor) -> Tensor:
    """``(n, C, kT, kH, kW) -> (n, kT·kH·kW·C)``: a view of a channels-last weight, a copy otherwise."""
    return w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)


def _scatter_patch_gradients(
    grad_patches: Tensor, shape: Sequence[int], sub: SubKernel, stride: tuple[int, int, int], into: Tensor
) -> None:
    """Add each tap's share of ``grad_patches`` ``(N·T'·H'·W', kT·kH·kW·C)`` into ``into``, the
    zero-padded ``(N, T + 2p_T, H + 2p_H, W + 2p_W, C)`` gradient of an input of ``shape``
    ``(N, C, T, H, W)`` for ``sub``'s padding."""
    n, c = shape[0], shape[1]
    out_t, out_h, out_w = _output_size(shape, stride)
    taps = grad_patches.view(n, out_t, out_h, out_w, *sub.size, c)
    st, sh, sw = stride
    for a in range(sub.size[0]):
        for b in range(sub.size[1]):
            for d in range(sub.size[2]):
                window = into[
                    :,
                    a : a + st * (out_t - 1) + 1 : st,
                    b : b + sh * (out_h - 1) + 1 : sh,
                    d : d + sw * (out_w - 1) + 1 : sw,
                ]
                window += taps[:, :, :, :, a, b, d]


class _Im2colConv3d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias: Tensor | None,
        subs: tuple[SubKernel, ...],
        stride: tuple[int, int, int],
        *weights: Tensor,
    ) -> Tensor:
        patches = {sub: _patches(x, sub, stride) for sub in dict.fromkeys(subs)}
        matrices = [_weight_matrix(w) for w in weights]  # made once per call, kept for the backward
        rows = [patches[sub] @ m.t() for m, sub in zip(matrices, subs, strict=True)]
        out = rows[0] if len(rows) == 1 else torch.cat(rows, 1)  # (N·T'·H'·W', C_out)
        if bias is not None:
            out += bias
        ctx.subs, ctx.stride, ctx.x_meta = subs, stride, (x.shape, x.dtype, x.device)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*patches.values(), *matrices)
        out_size = _output_size(x.shape, stride)
        return out.view(x.shape[0], *out_size, out.shape[1]).permute(0, 4, 1, 2, 3)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        subs, stride = ctx.subs, ctx.stride
        distinct = list(dict.fromkeys(subs))
        saved = ctx.saved_tensors
        patches = dict(zip(distinct, saved[: len(distinct)], strict=True))
        matrices = saved[len(distinct) :]  # (n_g, kT·kH·kW·C) per group
        shape, dtype, device = ctx.x_meta
        grad_rows = grad_out.permute(0, 2, 3, 4, 1).reshape(-1, grad_out.shape[1])  # (positions, C_out)
        grad_x: Tensor | None = None
        grad_weights: list[Tensor | None] = [None] * len(matrices)
        padded_grads: dict[tuple[int, int, int], Tensor] = {}  # padding -> padded (N, T+, H+, W+, C) gradient
        start = 0
        for g, (matrix, sub) in enumerate(zip(matrices, subs, strict=True)):
            n = matrix.shape[0]
            rows = grad_rows[:, start : start + n]
            start += n
            if ctx.needs_input_grad[4 + g]:
                grad_matrix = rows.t() @ patches[sub]  # (n, kT·kH·kW·C), the channels-last weight's bytes
                grad_weights[g] = grad_matrix.view(n, *sub.size, shape[1]).permute(0, 4, 1, 2, 3)
            if ctx.needs_input_grad[0]:
                pad = sub.padding
                if pad not in padded_grads:
                    padded_size = (length + 2 * p for length, p in zip(shape[2:], pad, strict=True))
                    padded_grads[pad] = torch.zeros(shape[0], *padded_size, shape[1], dtype=dtype, device=device)
                _scatter_patch_gradients(rows @ matrix, shape, sub, stride, padded_grads[pad])
        if ctx.needs_input_grad[0]:
            frames: Tensor | None = None  # (N, T, H, W, C)
            for (pt, ph, pw), padded in padded_grads.items():
                inner = padded[:, pt : pt + shape[2], ph : ph + shape[3], pw : pw + shape[4]]
                frames = inner.clone() if frames is None else frames.add_(inner)
            grad_x = frames.permute(0, 4, 1, 2, 3)  # channels-last
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (grad_x, grad_bias, None, None, *grad_weights)


def im2col_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
) -> Tensor:
    """Same function as :func:`~cakes.ops.reference.grouped_conv3d` (values and gradients), each group
    one GEMM over its patch matrix (see the module docstring; :func:`supports` says where it runs).

    ``x``: ``(N, C_in, T, H, W)``; ``weights[i]``: ``(n_i, C_in, *subs[i].size)``. Output
    ``(N, C_out, T', H', W')`` in channels-last memory, channels in group order."""
    if not supports(x, subs, stride):
        raise ValueError(
            f"im2col execution: the patch matrices of input {tuple(x.shape)} for {[s.name for s in subs]} at "
            f"stride {stride} hold {patch_elements(x, subs, stride)} elements, over the limit of {MAX_PATCH_ELEMENTS}"
        )
    return _Im2colConv3d.apply(x, bias, tuple(subs), tuple(stride), *weights)
