"""``PerLayer``: a different homogeneous operator per slot (e.g. the C2FNAS-Panc op sequence).

Keys are slot names (``c1.op0``) or dotted prefixes of them (``c1`` = every slot of cell c1); the
longest matching key wins, ``default`` covers the rest::

    PerLayer({"c0": "vol2d", "c1": "volp3d", "c2": "c3d"}, default="c3d")
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from cakes.ops.factory import Homogeneous, NormFactory, OperatorFactory
from cakes.ops.homogeneous import HOMOGENEOUS_OPS
from cakes.ops.subkernel import Stride


class PerLayer(OperatorFactory):
    """Homogeneous operator per slot; see the module docstring.

    Raises ``ValueError`` (in the constructor or :meth:`bind`) naming the offending key: an unknown
    operator kind, a key that matches no slot of the backbone, or a slot no key and no ``default``
    covers.
    """

    def __init__(self, kinds: Mapping[str, str], default: str | None = None) -> None:
        self.kinds = {str(k): str(v) for k, v in kinds.items()}
        self.default = default
        bad = {k: v for k, v in self.kinds.items() if v not in HOMOGENEOUS_OPS}
        if default is not None and default not in HOMOGENEOUS_OPS:
            bad["default"] = default
        if bad:
            raise ValueError(f"PerLayer: unknown operator kinds {bad}; known: {sorted(HOMOGENEOUS_OPS)}")
        self._ops = {kind: Homogeneous(kind) for kind in {*self.kinds.values(), *([default] if default else [])}}

    def kind(self, layer: str) -> str:
        """The operator kind of slot ``layer`` (longest matching key, else ``default``)."""
        parts = layer.split(".")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in self.kinds:
                return self.kinds[key]
        if self.default is None:
            raise ValueError(f"PerLayer: no operator for slot {layer!r} (no matching key and no default)")
        return self.default

    def bind(self, backbone: str, slots: Mapping[str, int]) -> None:
        unused = [k for k in self.kinds if not any(s == k or s.startswith(f"{k}.") for s in slots)]
        if unused:
            raise ValueError(f"PerLayer: keys {unused} match no slot of {backbone} (slots: {list(slots)})")
        for layer in slots:
            self.kind(layer)

    def __call__(
        self, *, layer: str, in_channels: int, out_channels: int, norm: NormFactory, stride: Stride = 1
    ) -> nn.Module:
        return self._ops[self.kind(layer)](
            layer=layer, in_channels=in_channels, out_channels=out_channels, norm=norm, stride=stride
        )

    def __repr__(self) -> str:
        return f"PerLayer({self.kinds}, default={self.default!r})"
