"""Sub-kernel convolution kernels shared by every CAKES operator.

* :func:`subkernel_conv` — one sub-kernel: a plain ``F.conv3d`` with shape-preserving padding.
* :func:`cakes_conv3d` — the whole heterogeneous op of :class:`~cakes.ops.conv.CakesConv3d`
  (every group, concatenated along channels, plus bias).
* :func:`dense_weight` — the same op as one zero-padded ``kxkxk`` weight (C3D's cost).

On CPU (float32/float64, no ``TorchDispatchMode`` active) :func:`cakes_conv3d` runs as ONE autograd
node, :class:`_CakesConvCPU`, instead of per-group ``F.conv3d`` + ``torch.cat`` + bias:

* every group writes into one preallocated output (no ``cat``; the bias is fused);
* oneDNN runs convolutions in blocks of output channels (16 with AVX-512, else 8), so a group of 85
  costs about as much as 96 (both layouts): the idle tail of a convolution's last block takes the
  leading channels of the next group when its sub-kernel is contained (e.g. 11 ``1x3x3`` channels
  ride in the ``3x3x3`` convolution, zero-padded), leaving the next convolution fewer blocks;
* channels-last forward convolutions with a full ``kxkxk`` sub-kernel run in chunks of 32 output
  channels (oneDNN blocks 85–192 channels by 48 or 64 there, ~25 % slower per channel);
* at stride 1 the input gradient is computed as forward convolutions of the output-gradient rows
  with the flipped, transposed kernels, which oneDNN adds in place into one channels-last
  accumulator (a binary post-op: no gradient tensor per group, no sum);
  otherwise per group with ``convolution_backward``, also channels-last (much faster there than
  on ``NCDHW``: no blocked-layout reorder of the full-width gradient), summed. For ``NCDHW``
  inputs the accumulator is transposed back once at the end. Weight gradients stay in the input's
  layout; the unit weights built for the forward (layout conversion, block fill) are reused;
* sub-kernels without spatial extent (``3x1x1``, ``1x1x1``; temporal stride 1) compute their weight
  gradient — and their forward on ``NCDHW`` or float64, their input gradient at other strides or
  in float64 — as shifted matrix products on the flattened ``(C, T·H·W)`` view of each sample: temporal tap
  ``d`` is a column offset of ``d·H·W``, so a tap is one exact ``addmm`` over the frames it touches
  (no padding, no im2col, no oneDNN layout reorders). A channels-last convolution reads the input
  once for all taps, the products once per tap, so oneDNN computes the rest there;
* with ``out_index`` (performance-priority slots) rows are scattered to their output channels as
  they are copied into the output, and their gradients gathered from there — no separate
  permutation pass.

Channels-last (the networks' default) is the faster layout for every part.

Everywhere else (GPU, meta, other dtypes, FLOP/MAC counters and other dispatch modes, ``torch.func``
transforms) it is the plain per-group form, so counters see the ``aten.convolution`` calls of the
closed-form MAC count. The CPU path itself calls ``aten.convolution``, ``aten.convolution_backward``,
``mkldnn._convolution_pointwise_``, ``aten.mm`` and ``aten.addmm`` (the block fill computes a few
zero taps, so a counter run on it would see slightly more MACs than the closed form — one reason
counters get the plain path).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from cakes.ops.subkernel import SubKernel

Stride = int | tuple[int, int, int]

_CL = torch.channels_last_3d
#: channels-last forward convolutions with a full k×k×k sub-kernel run in chunks of this many output
#: channels: oneDNN's channels-last forward (brgconv) costs ~0.39 ms per 3x3x3 output channel at 32
#: or 256 channels (blocked by 32) but ~0.49 at 96, 128 or 192 (blocked by 48 or 64; 256@8x28x28,
#: batch 2, 2 threads). 2D sub-kernels cost the same per channel at any width, so they run whole.
_CL_FORWARD_CHUNK = 32
_conv_backward = torch.ops.aten.convolution_backward
#: oneDNN convolution with an in-place binary post-op (``other = conv(x) + other``), used by
#: Inductor's CPU fusions; absent in builds without oneDNN
_conv_add = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None) if torch.backends.mkldnn.is_available() else None


def as_triple(stride: Stride) -> tuple[int, int, int]:
    """``2 -> (2, 2, 2)``; a 3-sequence passes through (validated)."""
    triple = (stride, stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(triple) != 3 or any(s < 1 for s in triple):
        raise ValueError(f"stride must be a positive int or a 3-tuple of positive ints, got {stride!r}")
    return triple  # type: ignore[return-value]


def subkernel_conv(x: Tensor, weight: Tensor, sub: SubKernel, stride: tuple[int, int, int], groups: int = 1) -> Tensor:
    """Shape-preserving (up to stride) convolution with a ``(out, in/groups, *sub.size)`` weight.

    ``(N, C_in, T, H, W) -> (N, out, T', H', W')``.
    """
    return F.conv3d(x, weight, stride=stride, padding=sub.padding, groups=groups)


def cakes_conv3d(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None = None,
    out_index: Tensor | None = None,
) -> Tensor:
    """``cat([subkernel_conv(x, w, sub, stride) for w, sub in zip(weights, subs)], 1) + bias``.

    ``weights[i]``: ``(n_i, C_in, *subs[i].size)``; output channels follow the group order, or, with
    ``out_index`` (a ``(C_out,)`` permutation), row ``r`` of the group order goes to output channel
    ``out_index[r]`` (``bias`` is per output channel). On CPU the rows are written to (and their
    gradients read from) their channels directly, so the permutation costs no extra pass.
    """
    stride = as_triple(stride)
    subs = tuple(subs)
    if _use_cpu_path(x, weights, bias):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=_CL)):
            x = x.contiguous()
        tensors = (x, bias, *weights)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _CakesConvCPU.apply(x, bias, subs, stride, out_index, *weights)
        return _forward_cpu(x, list(weights), subs, stride, bias, out_index)[0]
    return _forward_plain(x, weights, subs, stride, bias, out_index)


def dense_weight(weights: Sequence[Tensor], subs: Sequence[SubKernel], kernel_size: int) -> Tensor:
    """The equivalent zero-padded ``(C_out, C_in, k, k, k)`` weight of the groups (differentiable):
    ``cakes_conv3d(x, weights, subs, s) == F.conv3d(x, dense_weight(...), stride=s, padding=k // 2)``."""
    rows = []
    for w, sub in zip(weights, subs):
        pads: list[int] = []
        for s in reversed(sub.size):  # F.pad lists the last axis first
            pads += [(kernel_size - s) // 2, (kernel_size - s) // 2]
        rows.append(F.pad(w, pads))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _rows(t: Tensor) -> Tensor:
    """A channels-last 5-D tensor as the ``(N·T·H·W, C)`` matrix it is in memory (a view)."""
    return t.permute(0, 2, 3, 4, 1).view(-1, t.shape[1])


def _gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(1, index)``, contiguous in ``x``'s layout. Channels-last tensors are gathered
    as the ``(N·T·H·W, C)`` matrix they are in memory (a 5-D ``index_select`` along channels takes
    ~10x longer there)."""
    if x.dim() == 5 and _is_cl(x):
        n, _, t, h, w = x.shape
        rows = _rows(x)
        # torch.gather with a broadcast index: ~25 % faster than index_select along dim 1
        rows = torch.gather(rows, 1, index.view(1, -1).expand(rows.shape[0], -1))
        return rows.view(n, t, h, w, -1).permute(0, 4, 1, 2, 3)
    return x.index_select(1, index)


def _forward_plain(
    x: Tensor,
    weights: Sequence[Tensor],
    subs: Sequence[SubKernel],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    out_index: Tensor | None = None,
) -> Tensor:
    outputs = [subkernel_conv(x, w, sub, stride) for w, sub in zip(weights, subs)]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if out_index is not None:
        out = out.index_select(1, torch.argsort(out_index))
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out


# --------------------------------------------------------------------------------------------------
# CPU path
# --------------------------------------------------------------------------------------------------


def _use_cpu_path(x: Tensor, weights: Sequence[Tensor], bias: Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 5
        and x.dtype in (torch.float32, torch.float64)
        and all(w.device.type == "cpu" and w.dtype == x.dtype for w in weights)
        and (bias is None or (bias.device.type == "cpu" and bias.dtype == x.dtype))
        # FLOP/MAC counters, fake tensors, tracers and torch.func transforms see the plain convolutions
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _is_matmul(sub: SubKernel, stride: tuple[int, int, int]) -> bool:
    """``kx1x1`` / ``1x1x1`` groups at temporal stride 1: their weight gradient (and, where oneDNN does
    not take them, forward and input gradient) runs as shifted matrix products."""
    return sub.size[1] == 1 and sub.size[2] == 1 and stride[0] == 1


def _is_cl(t: Tensor) -> bool:
    """Channels-last (and not also plain contiguous, e.g. 1x1x1 spatial)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=_CL)


def _fmt(t: Tensor) -> torch.memory_format:
    return _CL if _is_cl(t) else torch.contiguous_format


def _onednn(x: Tensor) -> bool:
    return x.dtype == torch.float32 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _out_len(n: int, s: int) -> int:
    return (n - 1) // s + 1  # odd sub-kernels with padding size // 2


def _cm(t: Tensor, n: int) -> Tensor:
    """Sample ``n`` of a contiguous or channels-last 5-D tensor as a ``(C, T*H*W)`` matrix VIEW
    (row-major for ``NCDHW``, column-major for channels-last; BLAS takes either)."""
    s = t[n]
    if _is_cl(t):
        return s.permute(1, 2, 3, 0).view(-1, s.shape[0]).t()
    return s.view(s.shape[0], -1)


def _taps(sub: SubKernel, frames: int, frame: int) -> Iterator[tuple[int, slice, slice]]:
    """``(tap, output columns, input columns)`` of each temporal tap that touches the clip,
    centre tap (which covers every column) first."""
    p = sub.size[0] // 2
    for i in sorted(range(sub.size[0]), key=lambda i: abs(i - p)):
        d = i - p
        lo, hi = max(0, -d), frames - max(0, d)
        if hi > lo:
            yield i, slice(lo * frame, hi * frame), slice((lo + d) * frame, (hi + d) * frame)


def _spatial_sample(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
    """The input a ``kx1x1`` group reads at spatial stride (every s-th row / column)."""
    if stride[1] == 1 and stride[2] == 1:
        return x
    return x[:, :, :, :: stride[1], :: stride[2]].contiguous(memory_format=_fmt(x))


def _tap_weights(w: Tensor) -> Tensor:
    """``(out, in, k, 1, 1) -> (k, out, in)`` contiguous, one matrix per temporal tap."""
    return w[:, :, :, 0, 0].permute(2, 0, 1).contiguous()


def _to_fmt(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t.contiguous(memory_format=fmt)``; channels-last -> ``NCDHW`` as one 2-D transpose per sample
    (PyTorch's blocked transpose copy: ~3x faster than the 5-D strided copy, and a single
    pass rather than many small parallel copies, which stall when the CPU is shared)."""
    if fmt is not torch.contiguous_format or not _is_cl(t):
        return t.contiguous(memory_format=fmt)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    for n in range(t.shape[0]):
        _cm(out, n).copy_(_cm(t, n))
    return out


@dataclass(frozen=True)
class _ConvView:
    """How one sub-kernel convolution runs on CPU: as the 3-D convolution it is, or — channels-last
    float32, a size-1 axis pair at stride 1 — as a 2-D one on views of the same memory (oneDNN's
    2-D kernels are 5–15 % faster than its 3-D ones with unit axes):

    * ``frames`` — a ``1xkxk`` kernel at temporal stride 1: ``(N·T, C, H, W)``, kernel ``k x k``;
    * ``pixels`` — a ``kx1x1`` kernel at spatial stride 1: ``(N, C, T, H·W)``, kernel ``k x 1``.

    Channels-last tensors and their channel slices have both views; ``3d`` views are the tensors."""

    kind: str  # "3d" | "frames" | "pixels"
    stride: list[int]
    padding: list[int]

    @staticmethod
    def of(sub: SubKernel, stride: tuple[int, int, int], x: Tensor) -> _ConvView:
        if _is_cl(x) and _onednn(x):
            if sub.size[0] == 1 and stride[0] == 1:
                return _ConvView("frames", list(stride[1:]), list(sub.padding[1:]))
            if sub.size[1:] == (1, 1) and stride[1:] == (1, 1):
                return _ConvView("pixels", [stride[0], 1], [sub.padding[0], 0])
        return _ConvView("3d", list(stride), list(sub.padding))

    def view(self, t: Tensor) -> Tensor:
        """``(N, C, T, H, W)`` -> the view the convolution runs on."""
        n, c, frames, h, w = t.shape
        if self.kind == "frames":
            return t.transpose(1, 2).view(n * frames, c, h, w)
        return t.view(n, c, frames, h * w) if self.kind == "pixels" else t

    def unview(self, t: Tensor, like: Tensor) -> Tensor:
        """A result -> ``(N, C', T', H', W')``; ``like``: the 5-D input of the convolution (the axes
        a view merges keep their sizes: stride 1)."""
        n, _, _, h, w = like.shape
        if self.kind == "frames":
            return t.view(n, -1, *t.shape[1:]).transpose(1, 2)
        return t.view(*t.shape[:3], h, w) if self.kind == "pixels" else t

    def weight(self, w: Tensor) -> Tensor:
        """``(out, in, 1, k, k) -> (out, in, k, k)``, ``(out, in, k, 1, 1) -> (out, in, k, 1)``."""
        return w[:, :, 0] if self.kind == "frames" else w[:, :, :, :, 0] if self.kind == "pixels" else w

    def unweight(self, g: Tensor) -> Tensor:
        return g.unsqueeze(2) if self.kind == "frames" else g.unsqueeze(4) if self.kind == "pixels" else g

    def forward(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        conv = F.conv3d if self.kind == "3d" else F.conv2d
        return self.unview(conv(self.view(x), self.weight(w), bias, self.stride, self.padding), x)

    def backward(self, gy: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
        """``convolution_backward``'s input and weight gradients (``None`` where not needed);
        ``x``: only its shape and layout are read when ``need_w`` is false."""
        one, zero = [1] * len(self.stride), [0] * len(self.stride)
        conv = (self.stride, self.padding, one, False, zero, 1)
        gi, gw, _ = _conv_backward(self.view(gy), self.view(x), self.weight(w), None, *conv, [need_x, need_w, False])
        return (self.unview(gi, x) if need_x else None), (self.unweight(gw) if need_w else None)


@dataclass(frozen=True)
class _Unit:
    """Output rows ``[start, stop)`` computed by one call: a convolution with kernel ``sub``, or (``matmul``,
    see :func:`_is_matmul`) shifted matrix products for a ``kx1x1`` sub-kernel. ``parts``: the ``(group, first row, end row)`` weight
    rows it covers, in order; a convolution may end with leading rows of the next group whose
    sub-kernel it contains (zero-padded into its kernel)."""

    sub: SubKernel
    matmul: bool
    start: int
    stop: int
    parts: tuple[tuple[int, int, int], ...]


def _contains(outer: SubKernel, inner: SubKernel) -> bool:
    return all(i <= o for o, i in zip(outer.size, inner.size))


def _fill_block(x: Tensor) -> int:
    """oneDNN computes convolutions in blocks of 16 (AVX-512) or 8 output channels, so a group of 85
    costs about as much as one of 96. Returns that block when it applies, else 0."""
    if not _onednn(x):
        return 0
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def _units(subs: Sequence[SubKernel], sizes: Sequence[int], stride: tuple[int, int, int], block: int) -> list[_Unit]:
    """One unit per group; with ``block``, a convolution's last partial block is filled with the
    leading channels of the next group when its sub-kernel is contained (computed for free there)."""
    units: list[_Unit] = []
    taken = [0] * len(subs)
    start = 0
    for j, (sub, n) in enumerate(zip(subs, sizes)):
        lo = taken[j]
        if lo >= n:
            continue
        matmul = _is_matmul(sub, stride)
        parts = [(j, lo, n)]
        stop = start + n - lo
        if block and not matmul and j + 1 < len(subs) and _contains(sub, subs[j + 1]):
            r = min(-(n - lo) % block, sizes[j + 1])
            if r:
                parts.append((j + 1, 0, r))
                taken[j + 1] = r
                stop += r
        units.append(_Unit(sub, matmul, start, stop, tuple(parts)))
        start = stop
    return units


def _unit_weight(unit: _Unit, weights: Sequence[Tensor], subs: Sequence[SubKernel]) -> Tensor:
    pieces = []
    for j, lo, hi in unit.parts:
        w = weights[j] if (lo, hi) == (0, weights[j].shape[0]) else weights[j][lo:hi]
        if subs[j].size != unit.sub.size:
            pads: list[int] = []
            for big, small in zip(reversed(unit.sub.size), reversed(subs[j].size)):  # F.pad: last axis first
                pads += [(big - small) // 2] * 2
            w = F.pad(w, pads)
        pieces.append(w)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _scatter_weight_grad(unit: _Unit, g: Tensor, weights: Sequence[Tensor], subs, gws: list, need_w) -> None:
    """Unit weight gradient -> per-group gradients (centre slices of the padded rows)."""
    r = 0
    for j, lo, hi in unit.parts:
        piece = g[r : r + hi - lo]
        r += hi - lo
        if not need_w[j]:
            continue
        if subs[j].size != unit.sub.size:
            piece = piece[(slice(None), slice(None), *(slice((b - s) // 2, (b - s) // 2 + s) for b, s in zip(unit.sub.size, subs[j].size)))]
        if (lo, hi) == (0, weights[j].shape[0]):
            gws[j] = piece.contiguous()
        else:
            if gws[j] is None:
                gws[j] = torch.empty_like(weights[j])
            gws[j][lo:hi] = piece


def _matmul_forward(x_s: Tensor, w: Tensor, sub: SubKernel, y: Tensor, a: int, b: int, bias: Tensor | None) -> None:
    """``y[:, a:b] = conv(x_s, w) (+ bias)`` for a ``kx1x1`` weight, as shifted matrix products."""
    frames, frame = x_s.shape[2], x_s.shape[3] * x_s.shape[4]
    wt = _tap_weights(w)
    for n in range(x_s.shape[0]):
        X, Y = _cm(x_s, n), _cm(y, n)[a:b]
        for k, (i, cols_out, cols_in) in enumerate(_taps(sub, frames, frame)):
            if k == 0 and bias is None:  # centre tap: every column, beta = 0
                torch.mm(wt[i], X, out=Y)
                continue
            if k == 0:
                Y.copy_(bias.view(-1, 1).expand_as(Y))
            dst = Y[:, cols_out]
            torch.addmm(dst, wt[i], X[:, cols_in], out=dst)


def _put(y: Tensor, a: int, b: int, rows: Tensor, out_index: Tensor | None) -> None:
    """``y[:, a:b] = rows``, or into channels ``out_index[a:b]``."""
    if out_index is None:
        y[:, a:b] = rows
    elif _is_cl(y) and _is_cl(rows):
        dst, src = _rows(y), _rows(rows)
        dst.scatter_(1, out_index[a:b].view(1, -1).expand(src.shape[0], -1), src)
    else:
        y.index_copy_(1, out_index[a:b], rows)


def _take(gy: Tensor, a: int, b: int, out_index: Tensor | None) -> Tensor:
    """Rows ``[a, b)`` of the output gradient: ``gy[:, a:b]``, or channels ``out_index[a:b]``."""
    return gy[:, a:b] if out_index is None else _gather_channels(gy, out_index[a:b])


def _forward_cpu(
    x: Tensor,
    weights: list[Tensor],
    subs: tuple[SubKernel, ...],
    stride: tuple[int, int, int],
    bias: Tensor | None,
    out_index: Tensor | None,
) -> tuple[Tensor, dict[_Unit, Tensor]]:
    """The output, and each unit (``_units`` with the fill block, in order) with its weight, in
    ``x``'s layout when ``weights`` are (see :func:`_layout_weights`)."""
    units = _units(subs, [w.shape[0] for w in weights], stride, _fill_block(x))
    unit_weights = [_unit_weight(u, weights, subs) for u in units]
    # oneDNN channels-last convolutions read the input once for all taps; the shifted matrix products
    # read it once per tap, which costs more than the extra copy into the output there
    onednn_cl = _onednn(x) and _is_cl(x)
    if len(units) == 1 and (onednn_cl or not units[0].matmul) and out_index is None:
        return _ConvView.of(units[0].sub, stride, x).forward(x, unit_weights[0], bias), {units[0]: unit_weights[0]}
    N, _, T, H, W = x.shape
    fmt = _fmt(x)
    out_size = (_out_len(T, stride[0]), _out_len(H, stride[1]), _out_len(W, stride[2]))
    y = torch.empty((N, units[-1].stop, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
    if bias is not None and out_index is not None:
        bias = bias.index_select(0, out_index)  # per row
    x_s = None
    for u, w in zip(units, unit_weights):
        bias_u = None if bias is None else bias[u.start : u.stop]
        if not u.matmul or onednn_cl:
            full_3d = all(size > 1 for size in u.sub.size)
            chunk = _CL_FORWARD_CHUNK if full_3d and onednn_cl else w.shape[0]
            for c in range(0, w.shape[0], chunk):
                bias_c = None if bias_u is None else bias_u[c : c + chunk]
                rows = _ConvView.of(u.sub, stride, x).forward(x, w[c : c + chunk], bias_c)
                _put(y, u.start + c, u.start + c + rows.shape[1], rows, out_index)
            continue
        if x_s is None:
            x_s = _spatial_sample(x, stride)
        if out_index is None:
            _matmul_forward(x_s, w, u.sub, y, u.start, u.stop, bias_u)
        else:
            rows = torch.empty((N, u.stop - u.start, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
            _matmul_forward(x_s, w, u.sub, rows, 0, u.stop - u.start, bias_u)
            _put(y, u.start, u.stop, rows, out_index)
    return y, dict(zip(units, unit_weights))


def _layout_weights(x: Tensor, weights: Sequence[Tensor], subs: Sequence[SubKernel], stride) -> list[Tensor]:
    """Convolution weights in ``x``'s layout, converted once per step (``F.conv3d`` and its backward
    would convert them on every call: channels-last input -> channels-last weight)."""
    fmt = _fmt(x)
    return [w if _is_matmul(sub, stride) else w.contiguous(memory_format=fmt) for w, sub in zip(weights, subs)]


def _input_grad(
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
    view = _ConvView.of(sub, stride, like)
    if gx is None or stride != (1, 1, 1) or _conv_add is None:
        gi = view.backward(gy_rows, like, w, need_x=True, need_w=False)[0]
        return gi if gx is None else gx.add_(gi)
    w_t = view.weight(w.transpose(0, 1).flip(2, 3, 4))  # one copy; oneDNN reorders weights anyway
    one = [1] * len(view.padding)
    gx_v, gy_v = view.view(gx), view.view(gy_rows)
    _conv_add.binary(gx_v, gy_v, w_t, None, view.padding, one, one, 1, "add", None, None, [], None)
    return gx


def _matmul_backward(
    gy: Tensor,
    a: int,
    b: int,
    x_s: Tensor | None,
    w: Tensor,
    sub: SubKernel,
    gx_s: Tensor | None,
) -> Tensor | None:
    """Gradients of a ``kx1x1`` weight on output-gradient rows ``gy[:, a:b]``: accumulates the input
    gradient into ``gx_s`` (spatially sampled) if given, returns the weight gradient if ``x_s`` is given."""
    frames, frame = gy.shape[2], gy.shape[3] * gy.shape[4]
    wt = _tap_weights(w)
    gw = w.new_zeros(wt.shape) if x_s is not None else None
    for n in range(gy.shape[0]):
        G = _cm(gy, n)[a:b]
        for i, cols_out, cols_in in _taps(sub, frames, frame):
            if gx_s is not None:
                dst = _cm(gx_s, n)[:, cols_in]
                torch.addmm(dst, wt[i].t(), G[:, cols_out], out=dst)
            if gw is not None:
                torch.addmm(gw[i], G[:, cols_out], _cm(x_s, n)[:, cols_in].t(), out=gw[i])
    return None if gw is None else gw.permute(1, 2, 0).reshape(w.shape)


class _CakesConvCPU(torch.autograd.Function):
    """The whole heterogeneous convolution as one autograd node (CPU)."""

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
        ctx.subs, ctx.stride, ctx.has_bias = subs, stride, bias is not None
        ctx.save_for_backward(x, bias, out_index, *weights)
        # computed without autograd: kept on ctx (not inputs or outputs), reused by backward
        ctx.layout_weights = _layout_weights(x, weights, subs, stride)
        y, ctx.unit_weights = _forward_cpu(x, ctx.layout_weights, subs, stride, bias, out_index)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, bias, out_index, *weights = ctx.saved_tensors
        subs, stride = ctx.subs, ctx.stride
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[5:]
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate the plain form instead
            inputs = [t for t, need in zip([x, bias, *weights], [need_x, need_b, *need_w]) if need]
            y = _forward_plain(x, weights, subs, stride, bias, out_index)
            grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True))
            return (
                next(grads) if need_x else None,
                next(grads) if need_b else None,
                None,
                None,
                None,
                *(next(grads) if need else None for need in need_w),
            )
        fmt = _fmt(x)
        groups = _units(subs, [w.shape[0] for w in weights], stride, 0)
        layout_weights, unit_weights = ctx.layout_weights, ctx.unit_weights
        # oneDNN's backward-data is much faster channels-last: compute it per group there into one
        # channels-last accumulator (_input_grad; for NCDHW inputs transposed back once at the end);
        # kx1x1 groups join it where it accumulates in place (stride 1), else run as matrix products.
        # Weight gradients per unit (block fill as in the forward), in the input's layout
        cl_data = need_x and _onednn(x)
        fused_data = cl_data and stride == (1, 1, 1) and _conv_add is not None
        units = list(unit_weights) if cl_data else groups  # else: data and weight gradients together

        gx: Tensor | None = None
        gws: list[Tensor | None] = [None] * len(weights)
        taken: dict[tuple[int, int], Tensor] = {}

        def take(a: int, b: int, fmt: torch.memory_format | None = None) -> Tensor:
            """Output-gradient rows [a, b) (gathered with out_index), copied at most once."""
            rows = taken[a, b] if (a, b) in taken else _take(gy, a, b, out_index)
            taken[a, b] = rows if fmt is None else rows.contiguous(memory_format=fmt)
            return taken[a, b]

        if cl_data:
            # backward-data reads only the input's shape and layout (channels-last), never its values
            like_cl = x if fmt is _CL else torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_CL)
            for g in groups:
                if g.matmul and not fused_data:
                    continue
                # a channels-last gradient's channels are read in place (oneDNN takes the strides)
                gy_g = take(g.start, g.stop, None if _is_cl(gy) and fused_data else _CL)
                gx = _input_grad(gx, gy_g, layout_weights[g.parts[0][0]], g.sub, stride, like_cl)
        for u in units:
            if u.matmul:
                continue
            want_x = need_x and not cl_data
            want_w = any(need_w[j] for j, _, _ in u.parts)
            if want_x or want_w:
                w = unit_weights[u] if u in unit_weights else layout_weights[u.parts[0][0]]
                # oneDNN copies a gradient slice into a dense tensor anyway
                gy_u = take(u.start, u.stop, fmt)
                gi, gw = _ConvView.of(u.sub, stride, x).backward(gy_u, x, w, want_x, want_w)
                if want_x:
                    gx = gi if gx is None else gx.add_(gi)
                if want_w:
                    _scatter_weight_grad(u, gw, weights, subs, gws, need_w)

        matmul_x = [g for g in groups if g.matmul] if need_x and not fused_data else []
        matmul_w = [u for u in units if u.matmul and need_w[u.parts[0][0]]]
        if matmul_x or matmul_w:
            gy_m = gy.contiguous(memory_format=fmt)

            def rows(a: int, b: int) -> tuple[Tensor, int, int]:  # output-gradient rows [a, b) of a unit
                return (gy_m, a, b) if out_index is None else (take(a, b, fmt), 0, b - a)

            x_s = _spatial_sample(x, stride) if matmul_w else None
            sampled = stride[1] > 1 or stride[2] > 1
            gx_s = None
            if matmul_x:
                if gx is None:
                    gx = torch.zeros_like(x, memory_format=fmt)
                elif not (gx.is_contiguous() or gx.is_contiguous(memory_format=_CL)):
                    gx = gx.contiguous(memory_format=fmt)
                gx_s = torch.zeros_like(gx[:, :, :, :: stride[1], :: stride[2]], memory_format=_fmt(gx)) if sampled else gx
            both = units is groups  # the same partition: one pass over the taps for both gradients
            for g in matmul_x:
                j = g.parts[0][0]
                x_w = x_s if both and need_w[j] else None
                gw = _matmul_backward(*rows(g.start, g.stop), x_w, weights[j], g.sub, gx_s)
                if gw is not None:
                    _scatter_weight_grad(g, gw, weights, subs, gws, need_w)
            for u in matmul_w:
                if both and matmul_x:
                    continue
                j, lo, hi = u.parts[0]
                gw = _matmul_backward(*rows(u.start, u.stop), x_s, weights[j][lo:hi], u.sub, None)
                _scatter_weight_grad(u, gw, weights, subs, gws, need_w)
            if sampled and gx_s is not None:
                gx[:, :, :, :: stride[1], :: stride[2]] += gx_s

        if need_x:
            gx = torch.zeros_like(x) if gx is None else _to_fmt(gx, fmt)
        gb = gy.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and need_b else None
        return gx, gb, None, None, None, *gws
