"""Writing matplotlib figures the way the project writes every file (:mod:`cakes.files`): atomically,
with the umask-based mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG to ``path`` through a temporary file in the same folder, then close it."""
    import matplotlib.pyplot as plt

    from cakes.files import atomic_output

    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path
