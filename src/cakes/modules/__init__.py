"""LightningModules of the two tracks; both build their network from a config and share one operator library."""

from cakes.modules.segmentation import VolumeSegmentationModule
from cakes.modules.video import VideoClassificationModule

__all__ = ["VideoClassificationModule", "VolumeSegmentationModule"]
