"""Sub-kernel vocabulary: names such as ``"1x3x3"``, op sets, padding, strides and closed-form costs.

A sub-kernel is a shape ``A×B×C`` over the three kernel axes (T×H×W for video, D×H×W for volumes)
where every axis is either 1 or the full kernel size ``k``. It stands for the centred slice of a
``k×k×k`` kernel, so a layer that mixes sub-kernels per output channel is a ``k×k×k`` convolution whose
per-channel kernels are zero outside their sub-kernel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

_NAME = re.compile(r"^(\d+)x(\d+)x(\d+)$")

#: a convolution stride: one int for every axis, or ``(T, H, W)``
Stride = int | tuple[int, int, int]


def as_triple(stride: Stride) -> tuple[int, int, int]:
    """``2 -> (2, 2, 2)``; a 3-sequence passes through (validated)."""
    triple = (stride, stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(triple) != 3 or any(s < 1 for s in triple):
        raise ValueError(f"stride must be a positive int or a 3-tuple of positive ints, got {stride!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class SubKernel:
    """One sub-kernel of a ``k×k×k`` kernel, e.g. ``SubKernel.parse("1x3x3")``."""

    size: tuple[int, int, int]
    k: int = 3

    @classmethod
    def parse(cls, name: str, k: int = 3) -> SubKernel:
        """Parse and validate ``"AxBxC"``; every axis must be 1 or ``k``.

        Raises:
            ValueError: naming the bad value when the name is malformed or an axis is neither 1 nor k.
        """
        if isinstance(name, SubKernel):
            return name
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel size k must be a positive odd integer, got {k!r}")
        match = _NAME.match(str(name).strip()) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"bad sub-kernel name {name!r}: expected 'AxBxC' with each of A, B, C equal to 1 or {k}, "
                f"e.g. '1x{k}x{k}'"
            )
        size = tuple(int(g) for g in match.groups())
        bad = [s for s in size if s not in (1, k)]
        if bad:
            raise ValueError(
                f"bad sub-kernel {name!r}: axis size {bad[0]} is neither 1 nor the kernel size {k}"
                + (" (larger than the kernel)" if bad[0] > k else "")
            )
        return cls(size=size, k=k)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return "x".join(str(s) for s in self.size)

    def __str__(self) -> str:
        return self.name

    @property
    def volume(self) -> int:
        """Number of taps, e.g. 27 for 3x3x3, 9 for 1x3x3, 3 for 3x1x1."""
        return self.size[0] * self.size[1] * self.size[2]

    @property
    def rank(self) -> int:
        """How many axes are full (3 for 3D, 2 for 2D, 1 for 1D, 0 for 1x1x1)."""
        return sum(s == self.k for s in self.size if self.k > 1)

    @property
    def padding(self) -> tuple[int, int, int]:
        """Shape-preserving padding (per axis ``size // 2``)."""
        return tuple(s // 2 for s in self.size)  # type: ignore[return-value]

    @property
    def centre_slice(self) -> tuple[slice, slice, slice]:
        """Index of this sub-kernel inside a ``k×k×k`` kernel (centred)."""
        return tuple(slice((self.k - s) // 2, (self.k - s) // 2 + s) for s in self.size)  # type: ignore[return-value]

    def params_per_output_channel(self, in_channels: int, groups: int = 1) -> int:
        """Weights of one output channel (no bias)."""
        return (in_channels // groups) * self.volume

    def macs_per_output_element(self, in_channels: int, groups: int = 1) -> int:
        """Multiply-accumulates for one output element of one output channel."""
        return (in_channels // groups) * self.volume


def parse_counts(counts: Mapping[str, int], k: int = 3, where: str = "counts") -> list[tuple[SubKernel, int]]:
    """Validate a ``{sub-kernel name: output channels}`` mapping, keeping its order.

    Zero counts are kept (callers skip them); negative or non-integer counts and duplicate
    sub-kernels raise ``ValueError`` naming the entry.
    """
    if not isinstance(counts, Mapping):
        raise ValueError(f"{where}: expected a mapping of sub-kernel name -> channel count, got {counts!r}")
    parsed: list[tuple[SubKernel, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for name, count in counts.items():
        sub = SubKernel.parse(name, k)
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"{where}: count for {name!r} must be an integer, got {count!r}")
        if count < 0:
            raise ValueError(f"{where}: count for {name!r} is negative ({count})")
        if sub.size in seen:
            raise ValueError(f"{where}: sub-kernel {sub.name!r} is listed twice")
        seen.add(sub.size)
        parsed.append((sub, count))
    if sum(c for _, c in parsed) == 0:
        raise ValueError(f"{where}: counts {dict(counts)!r} give zero output channels")
    return parsed


@dataclass(frozen=True)
class OpSet:
    """A named, ordered set of candidate sub-kernels (3D first, then 2D, then 1D)."""

    name: str
    names: tuple[str, ...]
    k: int = 3

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError(f"op set {self.name!r} is empty")
        subs = [SubKernel.parse(n, self.k) for n in self.names]
        if len({s.size for s in subs}) != len(subs):
            raise ValueError(f"op set {self.name!r} lists a sub-kernel twice: {list(self.names)}")
        object.__setattr__(self, "names", tuple(s.name for s in subs))

    @cached_property
    def subkernels(self) -> tuple[SubKernel, ...]:
        return tuple(SubKernel.parse(n, self.k) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.subkernels)


#: The published search spaces. Video axes are T×H×W, volume axes D×H×W.
OP_SETS: dict[str, OpSet] = {
    s.name: s
    for s in (
        OpSet("c12d", ("1x3x3", "3x1x1")),
        OpSet("c23d", ("3x3x3", "1x3x3")),
        OpSet("c123d", ("3x3x3", "1x3x3", "3x1x1")),
        OpSet("v1d", ("3x1x1", "1x3x1", "1x1x3")),
        OpSet("v2d", ("1x3x3", "3x1x3", "3x3x1")),
        OpSet("v123d", ("3x3x3", "1x3x3", "3x1x3", "3x3x1", "3x1x1", "1x3x1", "1x1x3")),
    )
}


def resolve_op_set(spec: str | Sequence[str] | Mapping | OpSet, k: int = 3) -> OpSet:
    """An op set from a registered name (``"c123d"``), a list of sub-kernel names, or a mapping
    ``{name: ..., subkernels: [...]}`` as declared in a user's yaml."""
    if isinstance(spec, OpSet):
        return spec
    if isinstance(spec, str):
        if spec not in OP_SETS:
            raise ValueError(f"unknown op set {spec!r}; known: {sorted(OP_SETS)} (or give a list of sub-kernels)")
        return OP_SETS[spec]
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "subkernels"}
        if unknown or "subkernels" not in spec:
            raise ValueError(f"op set declaration {dict(spec)!r}: expected keys 'name' and 'subkernels'")
        return OpSet(str(spec.get("name", "custom")), tuple(spec["subkernels"]), k)
    if isinstance(spec, Sequence):
        names = tuple(str(s) for s in spec)
        return OpSet("custom:" + ",".join(names), names, k)
    raise ValueError(f"cannot read an op set from {spec!r}")
