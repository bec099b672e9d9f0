"""CPU fast path of the heterogeneous convolution (:func:`cakes.ops.cpu.function.cakes_conv3d`).

On CPU (float32/float64, no ``TorchDispatchMode`` active, switch on: :mod:`.switch`) the op runs as
ONE autograd node, :class:`~cakes.ops.cpu.function.CakesConvCPU`, instead of per-group ``F.conv3d`` +
``torch.cat`` + bias (:func:`cakes.ops.reference.grouped_conv3d`):

* every group writes into one preallocated output (no ``cat``; the bias is fused) — :mod:`.forward`;
* oneDNN runs convolutions in blocks of output channels (16 with AVX-512, else 8), so a group of 85
  costs about as much as 96 (both layouts): the idle tail of a convolution's last block takes the
  leading channels of the next group when its sub-kernel is contained (e.g. 11 ``1x3x3`` channels
  ride in the ``3x3x3`` convolution, zero-padded), leaving the next convolution fewer blocks —
  :mod:`.units`;
* channels-last forward convolutions with a full ``kxkxk`` sub-kernel run in chunks of 32 output
  channels (oneDNN blocks 85–192 channels by 48 or 64 there, ~25 % slower per channel); channels-last
  float32 convolutions with a unit axis pair run as 2-D ones on views of the same memory — :mod:`.views`;
* at stride 1 the input gradient is computed as forward convolutions of the output-gradient rows
  with the flipped, transposed kernels, which oneDNN adds in place into one channels-last
  accumulator (a binary post-op: no gradient tensor per group, no sum);
  otherwise per group with ``convolution_backward``, also channels-last (much faster there than
  on ``NCDHW``: no blocked-layout reorder of the full-width gradient), summed. For ``NCDHW``
  inputs the accumulator is transposed back once at the end. Weight gradients stay in the input's
  layout; the unit weights built for the forward (layout conversion, block fill) are reused —
  :mod:`.backward`;
* sub-kernels without spatial extent (``3x1x1``, ``1x1x1``; temporal stride 1) compute their weight
  gradient — and their forward on ``NCDHW`` or float64, their input gradient at other strides or
  in float64 — as shifted matrix products on the flattened ``(C, T·H·W)`` view of each sample
  (:mod:`.matmul`). A channels-last convolution reads the input once for all taps, the products
  once per tap, so oneDNN computes the rest there;
* with ``out_index`` (performance-priority slots) rows are scattered to their output channels as
  they are copied into the output, and their gradients gathered from there — no separate
  permutation pass (:mod:`.layout`).

Channels-last (the networks' default) is the faster layout for every part.

Everywhere else (GPU, meta, other dtypes, FLOP/MAC counters and other dispatch modes, ``torch.func``
transforms, the switch off) it is the plain per-group form, so counters see the ``aten.convolution``
calls of the closed-form MAC count. The fast path itself calls ``aten.convolution``,
``aten.convolution_backward``, ``mkldnn._convolution_pointwise_``, ``aten.mm`` and ``aten.addmm``
(the block fill computes a few zero taps, so a counter run on it would see slightly more MACs than
the closed form — one reason counters get the plain path). Every private torch entry point is
called from :mod:`.torch_shim`, which checks them at import.
"""
