"""Search-time callbacks: the supernet driver (lasso, sampling seeds) and the pruning export."""

from cakes.callbacks.prune import CakesPruneCallback, found_arch, plot_arch
from cakes.callbacks.supernet import SupernetCallback, apply_lasso

__all__ = ["CakesPruneCallback", "SupernetCallback", "apply_lasso", "found_arch", "plot_arch"]
