"""Backbones receive an operator factory for their replaceable slots."""

from cakes.backbones.resnet3d import ResNet3d

__all__ = ["ResNet3d"]
