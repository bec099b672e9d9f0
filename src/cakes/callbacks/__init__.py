"""Callbacks: the supernet driver (lasso, sampling seeds), the pruning export, and the resume state
(RNG states, data position, SIGTERM)."""

from cakes.callbacks.prune import CakesPruneCallback, found_arch, plot_arch
from cakes.callbacks.resume import ResumeStateCallback
from cakes.callbacks.supernet import SupernetCallback, apply_lasso

__all__ = ["CakesPruneCallback", "ResumeStateCallback", "SupernetCallback", "apply_lasso", "found_arch", "plot_arch"]
