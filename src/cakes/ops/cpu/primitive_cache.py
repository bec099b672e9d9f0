"""Room in oneDNN's primitive caches for every convolution of several networks in one process.

oneDNN (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and PyTorch's ideep layer (``LRU_CACHE_CAPACITY``) each
keep the last 1024 convolution primitives they created. A CAKES layer is several convolutions of
its own shapes (one per group and execution, forward and both backward passes), so a process that
runs several networks — the nine of the whole-network benchmark, a report comparing models —
exceeds 1024 and re-creates (JIT-compiles) primitives every step: nine ResNet-50 I3D in one process
ran 2–39 % slower per step than in their own processes, and 0.77–1.22× with 8192
(docs/results.md#whole-network-speed). Both variables are read when the first primitive is
created, so :func:`raise_capacity` must run before the first CPU convolution: importing
:mod:`cakes.ops` calls it, before its import-time probes (:mod:`.torch_shim`) create the package's
first primitives. A value the user set is kept. A convolution that runs before ``cakes.ops`` is
imported fixes the capacities at oneDNN's defaults for the process.
"""

from __future__ import annotations

import os

#: primitives each cache keeps
CAPACITY = 8192
ENV_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def raise_capacity(capacity: int = CAPACITY) -> dict[str, str]:
    """Set both capacity variables to ``capacity`` unless already set; returns the values in effect."""
    for name in ENV_VARS:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in ENV_VARS}
