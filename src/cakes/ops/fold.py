"""Batch norms folded into the convolutions before them, for inference.

In ``eval()`` a batch norm is a fixed per-channel affine map, ``y = scale·z + shift`` with
``scale = γ / sqrt(running_var + ε)`` and ``shift = β − running_mean·scale``. When ``z`` is a
convolution's output, the map folds into the convolution: each output channel's weights are
multiplied by its ``scale`` and its bias becomes ``scale·bias + shift``. The folded network computes
the same function in eval mode with one pass over every activation fewer per norm (what
``torch.ao``'s conv-BN fusion and onnxruntime do; docs/performance.md#batch-norms-folded-for-inference).

Which convolution feeds which norm is declared by the modules that own both, never guessed: a
module lists its ``(conv attribute, norm attribute)`` pairs in ``CONV_NORM_PAIRS`` (the ResNet
stem and bottleneck, :class:`~cakes.ops.factory.ConvNorm` slots), and an ``nn.Sequential`` whose
element ``i + 1`` is a batch norm pairs it with element ``i`` (projection shortcuts). A convolution
is folded into by its ``fold_output_affine(scale, shift)`` method (:class:`~cakes.ops.conv.CakesConv3d`:
its groups' rows), or, for modules with a ``(C_out, ...)`` ``weight`` and a ``bias`` (``nn.Conv3d``,
:class:`~cakes.ops.pointwise.PointwiseConv3d`, :class:`~cakes.ops.homogeneous.SubKernelConv3d`),
directly; an ``nn.Sequential`` of convolutions (a homogeneous recipe such as P3D) folds into its
last step. Instance norms (C2FNAS) normalise with each input's own statistics and are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: attribute a module sets to declare which of its children are ``(convolution, the norm after it)``
PAIRS_ATTRIBUTE = "CONV_NORM_PAIRS"


def norm_affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)``, each ``(C,)``, of an eval-mode batch norm: ``norm(z) == scale·z + shift``
    per channel."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"{norm}: a batch norm without running statistics normalises by each batch's; cannot fold")
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def fold_into_rows(conv: nn.Module, weights: Sequence[Tensor], scale: Tensor, shift: Tensor) -> None:
    """Fold ``scale·y + shift`` into a convolution whose output channels are the rows of ``weights``
    in order (one weight, or a :class:`~cakes.ops.conv.CakesConv3d`'s groups): each row times its
    ``scale``, and ``conv.bias`` set to ``scale·bias + shift`` (added if there was none). In place."""
    rows = sum(w.shape[0] for w in weights)
    if scale.shape != (rows,) or shift.shape != (rows,):
        raise ValueError(
            f"{type(conv).__name__}: expected scale and shift of shape ({rows},), "
            f"got {tuple(scale.shape)} and {tuple(shift.shape)}"
        )
    with torch.no_grad():
        for weight, row_scale in zip(weights, scale.split([w.shape[0] for w in weights]), strict=True):
            weight.mul_(row_scale.view(-1, *[1] * (weight.dim() - 1)).to(weight))
        bias = shift.clone() if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(weights[0]))


def fold_output_affine(conv: nn.Module, scale: Tensor, shift: Tensor, where: str) -> None:
    """Make ``conv(x)`` return ``scale·conv(x) + shift`` per output channel (in place, no grad).

    ``scale``, ``shift``: ``(C_out,)``. Raises ``TypeError`` naming ``where`` for a module it cannot
    fold into."""
    with torch.no_grad():
        if hasattr(conv, "fold_output_affine"):
            conv.fold_output_affine(scale, shift)
            return
        if isinstance(conv, nn.Sequential) and len(conv) > 0:
            fold_output_affine(conv[-1], scale, shift, f"{where}.{len(conv) - 1}")
            return
        weight = getattr(conv, "weight", None)
        if isinstance(weight, nn.Parameter) and hasattr(conv, "bias") and weight.shape[0] == scale.shape[0]:
            fold_into_rows(conv, [weight], scale, shift)
            return
    raise TypeError(
        f"{where}: cannot fold a batch norm of {scale.shape[0]} channels into {type(conv).__name__} "
        "(expected a convolution with a (C_out, ...) weight and a bias attribute, fold_output_affine, or a "
        "Sequential ending in one)"
    )


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """The ``(conv, norm)`` child names of ``module`` to fold: declared ones, or adjacent in a Sequential."""
    if isinstance(module, nn.Sequential):
        names = [name for name, _ in module.named_children()]
        return [
            (conv, norm)
            for conv, norm in zip(names, names[1:], strict=False)
            if isinstance(module.get_submodule(norm), nn.modules.batchnorm._BatchNorm)
        ]
    return list(getattr(module, PAIRS_ATTRIBUTE, ()))


def fold_batch_norms(net: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``net`` (in eval mode) with every declared ``conv → batch norm`` pair folded into the conv and
    the norm replaced by ``nn.Identity``: the same function in eval mode (up to float rounding).

    Returns a folded deep copy (``inplace=False``) or ``net`` itself. Raises ``ValueError`` for a
    network in training mode (a training step normalises by the batch, not the running statistics).
    """
    if net.training:
        raise ValueError("fold_batch_norms: the network is in training mode; folding uses running statistics (.eval())")
    folded = net if inplace else copy.deepcopy(net)
    for prefix, module in list(folded.named_modules()):
        for conv_name, norm_name in _pairs(module):
            norm = module.get_submodule(norm_name)
            where = f"{prefix}.{conv_name}" if prefix else conv_name
            if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
                continue  # an instance norm, or a norm folded already
            scale, shift = norm_affine(norm)
            fold_output_affine(module.get_submodule(conv_name), scale, shift, where)
            setattr(module, norm_name, nn.Identity())
    return folded
