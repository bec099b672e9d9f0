"""Shared test settings; the OmegaConf resolvers registered once, as the entry points do."""

import os

import pytest
import torch

from cakes.config import register_resolvers
from cakes.ops import plan


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


@pytest.fixture
def fresh_plan(request: pytest.FixtureRequest):
    """The test runs in the conv plan mode of its ``plan_mode`` marker (default ``benchmark``) with an
    empty plan (choices, timings, packed weights); the previous mode and an empty plan after."""
    marker = request.node.get_closest_marker("plan_mode")
    with plan.using(marker.args[0] if marker else "benchmark"):
        plan.clear()
        yield
        plan.clear()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist (``-n 2`` in ``pyproject.toml``) every worker computes on one thread, so the
    workers share the cores instead of oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first (otherwise in collection order): the workers start the longest runs
    at once instead of one of them finishing alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
