"""Shared test settings; the OmegaConf resolvers registered once, as the entry points do."""

import pytest

from cakes.config import register_resolvers


def pytest_configure(config: pytest.Config) -> None:
    """Register the configs' resolvers (``import cakes`` has no side effects)."""
    register_resolvers()


#: A tiny synthetic Something-Something set and CPU-sized loading: exercises the real loader and
#: every training hook in seconds. Tests extend it with their own trainer limits.
TINY_VIDEO = [
    "data.num_classes=4",
    "data.train_per_class=4",
    "data.val_per_class=2",
    "data.video_frames=8",
    "data.height=40",
    "data.width=48",
    "data.num_frames=4",
    "data.crop_size=32",
    "data.test_short_side=40",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
