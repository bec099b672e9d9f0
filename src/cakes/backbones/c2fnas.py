"""C2FNAS 3D segmentation backbone (Yu et al., CVPR 2020) with an injected operator factory.

Reconstructed as in ``docs/c2fnas.md`` (pinned by the published parameter and MAC counts). Every conv is
pre-activation ``ReLU → Conv (no bias) → InstanceNorm3d (affine)``. Data flow (width 1, 96³ patch,
level widths L1-L4 = 64/128/256/512)::

    image (N, 1, 96, 96, 96)
      └ stem: conv 3x3x3 1→32 → IN → ReLU → conv 3x3x3 /2 32→64 → IN       (N, 64, 48, 48, 48)
      └ 12 cells on the level path 1,1,2,2,3,4,3,3,2,1,1,1:
            plain  (c0 c3 c7 c10)  1x1x1 → [OP] → 1x1x1
            down   (c2 c4 c5)      3x3x3 /2 C→2C → [OP] → 1x1x1
            merge  (c1 c11)        x: 1x1x1 → [OP]; skip: 1x1x1 → [OP]; sum → 1x1x1
            merge-up (c6 c8 c9)    as merge, x = the lower level, first upsampled ×2 (trilinear)
                                   and reduced 1x1x1 2C→C
        L1 (N, 64, 48³)  L2 (N, 128, 24³)  L3 (N, 256, 12³)  L4 (N, 512, 6³);  c11 → (N, 64, 48³)
      └ head "light":  c11 → conv 3x3x3 64→32 → ×2 → conv 3x3x3 32→32 → ReLU → conv 1x1x1 → logits
        head "concat": [c11, c10] → conv 3x3x3 128→64 → ×2 → conv 3x3x3 64→32 → ReLU → conv 1x1x1
                                                                    (N, num_classes, 96, 96, 96)

Each ``[OP]`` (C→C, stride 1) is a slot built by the operator factory: ``c0.op0``, ``c1.op0``,
``c1.op1``, … (17 in all; merge cells have two, ``op0`` on the x branch, ``op1`` on the skip). The
stem, the stride-2 convs, the 1x1x1 convs and the head never are. A cost-priority supernet slot
emits ``n·C`` channels; the sum and the 1x1x1 conv after it take ``slot.out_channels``. The "×1" of
the 2D/P3D baselines (``vol2d`` = 3x3x1, ``volp3d`` = 3x3x1 → 1x1x3) is the last axis: the slice
axis of RAS volumes in MONAI's channel-first layout. Spatial sizes must be divisible by 16.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cakes.backbones.base import SlotBuilder, scaled_width
from cakes.ops.factory import OperatorFactory
from cakes.ops.norm import InstanceNorm3d
from cakes.ops.pointwise import PointwiseConv3d

BACKBONE_NAME = "c2fnas"
LEVEL_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 32
#: (cell, level 1-4, kind, inputs) — kinds: plain, down, merge, merge_up (x input first)
CELLS: tuple[tuple[str, int, str, tuple[str, ...]], ...] = (
    ("c0", 1, "plain", ("stem",)),
    ("c1", 1, "merge", ("c0", "stem")),
    ("c2", 2, "down", ("c1",)),
    ("c3", 2, "plain", ("c2",)),
    ("c4", 3, "down", ("c3",)),
    ("c5", 4, "down", ("c4",)),
    ("c6", 3, "merge_up", ("c5", "c4")),
    ("c7", 3, "plain", ("c6",)),
    ("c8", 2, "merge_up", ("c7", "c3")),
    ("c9", 1, "merge_up", ("c8", "c1")),
    ("c10", 1, "plain", ("c9",)),
    ("c11", 1, "merge", ("c10", "c9")),
)
HEADS = ("light", "concat")
#: the norm of every conv and slot (affine: its γ are the path weights of a supernet slot)
INSTANCE_NORM = partial(InstanceNorm3d, affine=True)


class PreActConv(nn.Sequential):
    """``ReLU → Conv3d (k³, no bias, 'same' padding) → InstanceNorm3d``;
    ``(N, C_in, …) -> (N, C_out, …/stride)``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, activation: bool = True
    ) -> None:
        super().__init__()
        if activation:
            self.act = nn.ReLU()
        self.conv = (
            PointwiseConv3d(in_channels, out_channels, stride=stride)
            if kernel_size == 1
            else nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        )
        self.norm = INSTANCE_NORM(out_channels)


class ChainCell(nn.Module):
    """plain ``1x1x1 → OP → 1x1x1`` (C→C) or down ``3x3x3 /2 (C→2C) → OP → 1x1x1``.

    ``(N, C_in, D, H, W) -> (N, C, D', H', W')`` with ``C`` the cell's level width.
    """

    def __init__(self, *, name: str, in_channels: int, channels: int, down: bool, operator: SlotBuilder) -> None:
        super().__init__()
        self.pre = PreActConv(in_channels, channels, 3 if down else 1, 2 if down else 1)
        self.op0 = operator(layer=f"{name}.op0", in_channels=channels, out_channels=channels, norm=INSTANCE_NORM)
        self.post = PreActConv(self.op0.out_channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.op0(F.relu(self.pre(x))))


class MergeCell(nn.Module):
    """``x: 1x1x1 → OP``; ``skip: 1x1x1 → OP``; sum → 1x1x1. With ``up``, ``x`` comes from the level
    below: trilinear ×2 first, and its 1x1x1 reduces 2C→C.

    ``(N, C_x, D/s, H/s, W/s), (N, C, D, H, W) -> (N, C, D, H, W)`` with ``s = 2`` if ``up`` else 1.
    """

    def __init__(self, *, name: str, x_channels: int, channels: int, up: bool, operator: SlotBuilder) -> None:
        super().__init__()
        self.up = up
        self.pre_x = PreActConv(x_channels, channels)
        self.pre_s = PreActConv(channels, channels)
        self.op0 = operator(layer=f"{name}.op0", in_channels=channels, out_channels=channels, norm=INSTANCE_NORM)
        self.op1 = operator(layer=f"{name}.op1", in_channels=channels, out_channels=channels, norm=INSTANCE_NORM)
        if self.op0.out_channels != self.op1.out_channels:
            raise ValueError(
                f"cell {name}: op0 emits {self.op0.out_channels} channels, op1 {self.op1.out_channels}; "
                "the two branches are summed and must match"
            )
        self.post = PreActConv(self.op0.out_channels, channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.post(self.op0(F.relu(self.pre_x(x))) + self.op1(F.relu(self.pre_s(skip))))


class Head(nn.Sequential):
    """``conv 3x3x3 in→mid → ×2 → conv 3x3x3 mid→out → ReLU → conv 1x1x1 (bias) → classes``;
    ``(N, in, D/2, H/2, W/2) -> (N, num_classes, D, H, W)``."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv_a = PreActConv(in_channels, mid_channels, 3)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv_b = PreActConv(mid_channels, out_channels, 3)
        self.act = nn.ReLU()
        self.classifier = PointwiseConv3d(out_channels, num_classes, bias=True)


class C2FNAS(nn.Module):
    """C2FNAS segmentation network; see the module docstring for the data flow.

    Args:
        operator: builds the 17 OP slots (homogeneous, derived, uniform or a supernet slot).
        width: channel multiplier of every conv (tests and demos use e.g. 0.125).
        num_classes: output channels (background included).
        head: ``"light"`` (reproduces the published parameter counts) or ``"concat"``.
        in_channels: image channels (1 for CT).

    ``(N, in_channels, D, H, W) -> (N, num_classes, D, H, W)`` logits; ``D, H, W`` divisible by 16.
    """

    name = BACKBONE_NAME

    def __init__(
        self,
        *,
        operator: OperatorFactory,
        width: float = 1.0,
        num_classes: int = 3,
        head: str = "light",
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"c2fnas width multiplier must be positive, got {width}")
        if head not in HEADS:
            raise ValueError(f"c2fnas head must be one of {HEADS}, got {head!r}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"c2fnas num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        self.width, self.num_classes, self.head_kind = width, num_classes, head
        slot_builder = SlotBuilder(operator, BACKBONE_NAME, self.slots(width=width))
        widths = [scaled_width(c, width) for c in LEVEL_WIDTHS]
        stem = scaled_width(STEM_WIDTH, width)
        self.stem = nn.Sequential(
            PreActConv(in_channels, stem, 3, activation=False), PreActConv(stem, widths[0], 3, stride=2)
        )
        level_of = {"stem": 1}
        for name, level, kind, inputs in CELLS:
            channels, x_channels = widths[level - 1], widths[level_of[inputs[0]] - 1]
            if kind in ("plain", "down"):
                cell: nn.Module = ChainCell(
                    name=name, in_channels=x_channels, channels=channels, down=kind == "down", operator=slot_builder
                )
            else:
                cell = MergeCell(
                    name=name, x_channels=x_channels, channels=channels, up=kind == "merge_up", operator=slot_builder
                )
            self.add_module(name, cell)
            level_of[name] = level
        self.built_slots = slot_builder.finish()
        head_in, head_mid = (widths[0], stem) if head == "light" else (2 * widths[0], widths[0])
        self.head = Head(head_in, head_mid, stem, num_classes)

    #: the smallest input size per axis: the deepest level (1/16) keeps two voxels, so its instance
    #: norms see more than one spatial element
    MIN_INPUT_SIZE = 32

    @classmethod
    def check_input_size(cls, spatial: tuple[int, ...] | list[int], source: str = "input size") -> None:
        """``ValueError`` naming ``source`` unless ``spatial`` is three sizes, each a multiple of 16 and
        at least :data:`MIN_INPUT_SIZE` (checked before the network runs)."""
        sizes = [int(s) for s in spatial]
        if len(sizes) != 3 or any(s % 16 or s < cls.MIN_INPUT_SIZE for s in sizes):
            fitting = [max(cls.MIN_INPUT_SIZE, -(-s // 16) * 16) for s in sizes]
            raise ValueError(
                f"{source} {sizes}: C2FNAS needs three sizes, each a multiple of 16 and at least "
                f"{cls.MIN_INPUT_SIZE} (its deepest level is 1/16 of the input; its instance norms need "
                f"more than one voxel there), e.g. {fitting}"
            )

    @staticmethod
    def slots(*, width: float = 1.0) -> dict[str, int]:
        """Replaceable convs ``{layer name: output width}`` in module order."""
        slots: dict[str, int] = {}
        for name, level, kind, _ in CELLS:
            for i in range(2 if kind.startswith("merge") else 1):
                slots[f"{name}.op{i}"] = scaled_width(LEVEL_WIDTHS[level - 1], width)
        return slots

    def forward(self, x: Tensor) -> Tensor:
        spatial = tuple(x.shape[2:])
        if len(spatial) != 3 or any(s % 16 for s in spatial):
            raise ValueError(f"c2fnas input must be (N, C, D, H, W) with D, H, W divisible by 16, got {tuple(x.shape)}")
        feats = {"stem": self.stem(x)}
        for name, _, _, inputs in CELLS:
            feats[name] = getattr(self, name)(*(feats[i] for i in inputs))
        top = feats["c11"] if self.head_kind == "light" else torch.cat([feats["c11"], feats["c10"]], dim=1)
        return self.head(top)
