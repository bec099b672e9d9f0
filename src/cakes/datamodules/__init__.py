"""Lightning data modules."""

from cakes.datamodules.something import (
    BadSampleError,
    BadSampleWarning,
    SomethingSomethingDataModule,
    SomethingSomethingDataset,
    SyntheticSomethingSomethingDataModule,
)

__all__ = [
    "BadSampleError",
    "BadSampleWarning",
    "SomethingSomethingDataModule",
    "SomethingSomethingDataset",
    "SyntheticSomethingSomethingDataModule",
]
