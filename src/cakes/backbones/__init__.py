"""Backbones receive an operator factory for their replaceable slots."""

from cakes.backbones.c2fnas import C2FNAS
from cakes.backbones.resnet3d import ResNet3d

__all__ = ["C2FNAS", "ResNet3d"]
