"""``cakes.ops.norm.InstanceNorm3d``: ``nn.InstanceNorm3d`` that keeps a channels-last input channels-last.

Values and gradients are those of ``nn.InstanceNorm3d`` for one sample and for a batch, in both
layouts, in training and eval mode; the rewrite runs only where it is meant to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cakes.ops import fast_path
from cakes.ops.norm import InstanceNorm3d

CL = torch.channels_last_3d


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_values_and_gradients_match_nn_instance_norm(batch, layout, affine, training):
    torch.manual_seed(0)
    norm = InstanceNorm3d(5, affine=affine).double().train(training)
    plain = nn.InstanceNorm3d(5, affine=affine).double().train(training)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        plain.load_state_dict(norm.state_dict())
    x = (3 * torch.randn(batch, 5, 4, 6, 3, dtype=torch.float64) + 1).contiguous(memory_format=layout)
    x.requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y, ref = norm(x), plain(ref_x)
    torch.testing.assert_close(y, ref)
    assert y.is_contiguous(memory_format=layout)
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)
    if affine:
        torch.testing.assert_close(norm.weight.grad, plain.weight.grad)
        torch.testing.assert_close(norm.bias.grad, plain.bias.grad)


def test_plain_instance_norm_when_switched_off_or_exported(monkeypatch):
    norm = InstanceNorm3d(4, affine=True)
    x = torch.randn(1, 4, 3, 5, 5).contiguous(memory_format=CL)
    assert norm(x).is_contiguous(memory_format=CL)
    with fast_path(False):
        assert not norm(x).is_contiguous(memory_format=CL)  # PyTorch's instance_norm returns NCDHW
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not norm(x).is_contiguous(memory_format=CL)
