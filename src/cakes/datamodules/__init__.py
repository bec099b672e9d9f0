"""Lightning data modules: video (:mod:`~cakes.datamodules.video`, the base a new video dataset
subclasses; :mod:`~cakes.datamodules.something`) and CT volumes (:mod:`~cakes.datamodules.volume`,
:mod:`~cakes.datamodules.msd`, :mod:`~cakes.datamodules.nih`)."""

from cakes.datamodules.something import SomethingSomethingDataModule
from cakes.datamodules.video import VideoDataModule
from cakes.datamodules.video_dataset import VideoClipDataset
from cakes.datamodules.video_readers import BadSampleError, BadSampleWarning

__all__ = [
    "BadSampleError",
    "BadSampleWarning",
    "SomethingSomethingDataModule",
    "VideoClipDataset",
    "VideoDataModule",
]
