"""The random number generator states of this process (python, numpy, torch CPU and CUDA) as plain
data — tensors, numbers, strings and lists, so a checkpoint holding them loads with
``torch.load(..., weights_only=True)`` — and their restoration."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_states() -> dict[str, Any]:
    """This process's RNG states ``{"python", "numpy", "torch"[, "cuda"]}`` as plain data (numpy's
    key as an int64 tensor; CUDA only once CUDA is initialised)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators found in ``states`` (from :func:`capture_rng_states`); CUDA states that do
    not fit this machine's devices are skipped with a warning."""
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in states:
        npy = states["numpy"]
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
        )
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(states["cuda"])
        except (RuntimeError, IndexError):  # a different number of GPUs: keep the fresh streams
            log.warning("resume: could not restore the CUDA RNG states (device count changed?)")
