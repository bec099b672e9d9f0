"""ResNet I3D-style video backbone (torchvision v1.5 layout) with an injected operator factory.

Data flow (depth 50, width 1, 8×224² input)::

    clip (N, 3, T, 224, 224)
      └ stem: conv 1x7x7 /(1,2,2) → BN → ReLU → max-pool 1x3x3 /(1,2,2)     (N, 64, T, 56, 56)
      └ layer1 … layer4: bottlenecks  1x1x1 → [slot: op 3x3 + BN] → 1x1x1   (N, 2048, T, 7, 7)
            stride (1, 2, 2) on the slot of each stage's first block (layer2-4), never in time
      └ head: spatial average per frame → dropout → Linear per frame → mean over frames
                                                                            (N, num_classes)

Only the middle conv of each bottleneck (``layer1.0`` … ``layer4.2``; for basic blocks both convs,
``layer1.0.conv1`` / ``layer1.0.conv2``) is a slot built by the operator factory; every other conv
is 2D-in-space with kT = 1, so ImageNet weights map one-to-one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from cakes.backbones.base import InflationReport, SlotBuilder, scaled_width
from cakes.ops.factory import OperatorFactory
from cakes.ops.inflate import tile_input_channels
from cakes.ops.pointwise import PointwiseConv3d

BACKBONE_NAME = "resnet3d"

#: depth -> (block kind, blocks per stage)
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
#: the tensors of a torchvision BatchNorm2d (``num_batches_tracked`` is ignored)
BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def _pointwise(in_channels: int, out_channels: int, stride: int = 1) -> PointwiseConv3d:
    return PointwiseConv3d(in_channels, out_channels, stride=(1, stride, stride))


class Bottleneck(nn.Module):
    """``1x1x1 → slot (3x3 op + BN) → 1x1x1`` with identity or projected shortcut."""

    #: convs and the batch norms after them (folded for inference: :func:`cakes.ops.fold.fold_batch_norms`)
    CONV_NORM_PAIRS = (("conv1", "bn1"), ("conv3", "bn3"))

    def __init__(
        self,
        *,
        name: str,
        in_channels: int,
        planes: int,
        stride: int,
        operator: SlotBuilder,
    ) -> None:
        super().__init__()
        out_channels = planes * EXPANSION["bottleneck"]
        self.conv1 = _pointwise(in_channels, planes)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = operator(
            layer=name, in_channels=planes, out_channels=planes, stride=(1, stride, stride), norm=nn.BatchNorm3d
        )
        self.conv3 = _pointwise(self.conv2.out_channels, out_channels)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(_pointwise(in_channels, out_channels, stride), nn.BatchNorm3d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.conv2(out))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: a fresh output, which no backward needs (one tensor fewer per block)
        return self.relu(out)


class BasicBlock(nn.Module):
    """``slot → slot`` (both 3x3 convs replaceable) with identity or projected shortcut."""

    def __init__(self, *, name: str, in_channels: int, planes: int, stride: int, operator: SlotBuilder) -> None:
        super().__init__()
        self.conv1 = operator(
            layer=f"{name}.conv1",
            in_channels=in_channels,
            out_channels=planes,
            stride=(1, stride, stride),
            norm=nn.BatchNorm3d,
        )
        self.conv2 = operator(
            layer=f"{name}.conv2", in_channels=self.conv1.out_channels, out_channels=planes, norm=nn.BatchNorm3d
        )
        if self.conv2.out_channels != planes:
            raise ValueError(
                f"{name}.conv2 emits {self.conv2.out_channels} channels for {planes}: a cost-priority slot needs an "
                "aggregating conv after it, but a basic block's second conv feeds the residual sum; "
                "search on bottleneck ResNets (depth 50/101)"
            )
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(_pointwise(in_channels, planes, stride), nn.BatchNorm3d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        out += identity  # in place, as in the bottleneck
        return self.relu(out)


class ResNet3d(nn.Module):
    """3D ResNet for clip classification; see the module docstring for the data flow.

    ``(N, 3, T, H, W) -> (N, num_classes)`` logits (mean of per-frame logits).
    """

    name = BACKBONE_NAME
    #: the stem conv and its batch norm (folded for inference: :func:`cakes.ops.fold.fold_batch_norms`)
    CONV_NORM_PAIRS = (("conv1", "bn1"),)

    def __init__(
        self,
        *,
        operator: OperatorFactory,
        depth: int = 50,
        width: float = 1.0,
        num_classes: int = 174,
        dropout: float = 0.3,
        in_channels: int = 3,
        pretrained: str | Path | None = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"resnet3d depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if width <= 0:
            raise ValueError(f"resnet3d width multiplier must be positive, got {width}")
        self.depth, self.width, self.num_classes = depth, width, num_classes
        kind, blocks = RESNET_DEPTHS[depth]
        block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
        slot_builder = SlotBuilder(operator, BACKBONE_NAME, self.slots(depth=depth, width=width))

        stem = scaled_width(64, width)
        self.conv1 = nn.Conv3d(in_channels, stem, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        channels = stem
        for stage, n_blocks in enumerate(blocks):
            planes = scaled_width(64 * 2**stage, width)
            layer = []
            for i in range(n_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                layer.append(
                    block_cls(
                        name=f"layer{stage + 1}.{i}",
                        in_channels=channels,
                        planes=planes,
                        stride=stride,
                        operator=slot_builder,
                    )
                )
                channels = planes * EXPANSION[kind]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.built_slots = slot_builder.finish()
        self.feature_channels = channels
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()
        self.inflation: InflationReport | None = None
        if pretrained:
            self.inflation = self.load_imagenet(pretrained)

    @staticmethod
    def slots(*, depth: int, width: float) -> dict[str, int]:
        """Replaceable convs ``{layer name: output width}`` in module order."""
        kind, blocks = RESNET_DEPTHS[depth]
        slots: dict[str, int] = {}
        for stage, n_blocks in enumerate(blocks):
            planes = scaled_width(64 * 2**stage, width)
            for i in range(n_blocks):
                name = f"layer{stage + 1}.{i}"
                if kind == "bottleneck":
                    slots[name] = planes
                else:
                    slots[f"{name}.conv1"] = planes
                    slots[f"{name}.conv2"] = planes
        return slots

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm3d,)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: Tensor) -> Tensor:
        """``(N, 3, T, H, W) -> (N, C, T, H/32, W/32)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        feats = self.features(x).mean(dim=(3, 4)).transpose(1, 2)  # (N, T, C)
        logits = self.fc(self.dropout(feats))  # (N, T, classes), fc per frame
        return logits.mean(dim=1)

    # ImageNet initialisation -------------------------------------------------------------------
    def load_imagenet(self, source: str | Path | Mapping[str, Tensor]) -> InflationReport:
        """Initialise from a torchvision-format 2D ResNet state dict (a local file or a mapping).

        Stem and 1x1 convs get kT = 1; each slot inflates its conv2 rows by the CAKES rules and
        loads its BN (a supernet slot repeats them per candidate); an aggregating conv fed by a
        widened slot is tiled along its input. The 1000-way fc is dropped. Every source key must
        be used and fit, else ``ValueError`` naming the keys.
        """
        inflation = ImageNetInflation(read_2d_state(source), self)
        slots: list[str] = []
        for name, module in self.named_modules():
            if any(name.startswith(f"{slot}.") for slot in slots):
                continue  # inside a slot: the slot loads it
            if isinstance(module, nn.Conv3d) and f"{name}.weight" in inflation.state:
                inflation.load_conv(name, module)
            elif isinstance(module, nn.BatchNorm3d) and f"{name}.weight" in inflation.state:
                inflation.load_norm(name)
            elif hasattr(module, "inflate_from_2d"):  # a slot: its conv and its BN, every key of both
                slots.append(name)
                inflation.load_slot(name, module)
        return inflation.finish(slots)


def read_2d_state(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision-format 2D state dict from a local file (``state_dict`` entry unwrapped) or a
    mapping, without ``module.`` prefixes and ``num_batches_tracked`` entries."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights not found: {path} (set backbone.pretrained to a local file)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    else:
        state = dict(source)
    return {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("num_batches_tracked")}


class ImageNetInflation:
    """One ImageNet initialisation of a network in progress: which source keys were used, which
    model tensors were fed, and the problems found (raised together by :meth:`finish`)."""

    def __init__(self, state: dict[str, Tensor], net: nn.Module) -> None:
        self.state, self.net = state, net
        self.report = InflationReport()
        self.own = dict(net.named_parameters()) | dict(net.named_buffers())
        self.fed: set[str] = set()
        self.unused = set(state)
        self.problems: list[str] = []

    def take(self, key: str) -> Tensor:
        """The source tensor ``key``, marked as used."""
        self.unused.discard(key)
        self.report.loaded.append(key)
        return self.state[key]

    def copy_into(self, target: str, value: Tensor) -> None:
        """Copy ``value`` into the model tensor ``target`` (a problem if absent or of another shape)."""
        if target not in self.own:
            self.problems.append(f"{target}: no such tensor in the model")
            return
        if self.own[target].shape != value.shape:
            self.problems.append(f"{target}: model {tuple(self.own[target].shape)} vs source {tuple(value.shape)}")
            return
        with torch.no_grad():
            self.own[target].copy_(value)
        self.fed.add(target)

    def norm_state(self, prefix: str) -> dict[str, Tensor]:
        """The source BN tensors under ``prefix`` (``weight``, ``bias``, running statistics)."""
        return {n: self.take(f"{prefix}.{n}") for n in BN_KEYS if f"{prefix}.{n}" in self.state}

    def load_conv(self, name: str, module: nn.Conv3d) -> None:
        """A 2D conv ``(out, in, k, k)`` as ``(out, in, 1, k, k)``; tiled along its input when it
        aggregates a widened supernet slot."""
        w = self.take(f"{name}.weight")
        if w.dim() == 4:
            w = w.unsqueeze(2)
        times = module.in_channels // w.shape[1] if w.shape[1] else 1
        if times > 1 and module.in_channels == times * w.shape[1]:
            w = tile_input_channels(w, times)  # aggregating conv after a widened supernet slot
        self.copy_into(f"{name}.weight", w)

    def load_norm(self, name: str) -> None:
        for key, value in self.norm_state(name).items():
            self.copy_into(f"{name}.{key}", value)

    def load_slot(self, name: str, slot: nn.Module) -> None:
        """A slot inflates its conv from the 2D conv of the same name and loads the matching BN
        (``conv2`` -> ``bn2``) through its ``inflate_from_2d`` hook."""
        bn_prefix = re.sub(r"conv(\d+)$", r"bn\1", name)
        if bn_prefix == name:
            self.problems.append(f"{name}: no matching BN in the source for this slot")
            return
        needed = [f"{name}.weight", *(f"{bn_prefix}.{n}" for n in BN_KEYS)]
        missing = [k for k in needed if k not in self.state]
        if missing:
            self.problems.append(f"slot {name}: source keys missing: {missing}")
            self.unused.difference_update(needed)  # named here, not again as "not used"
            return
        try:
            loaded = slot.inflate_from_2d(self.take(f"{name}.weight"), self.norm_state(bn_prefix))
        except (ValueError, RuntimeError) as err:
            self.problems.append(f"{name}: {err}")
            return
        self.fed.update(f"{name}.{k}" for k in loaded)

    def finish(self, slots: list[str]) -> InflationReport:
        """The report, once every model tensor outside ``fc`` was fed and every source key but the
        1000-way ``fc`` used; else ``ValueError`` listing every problem."""
        slot_prefixes = tuple(f"{n}." for n in slots)
        not_fed = [
            k
            for k in self.own
            if k not in self.fed and not k.startswith(("fc.", *slot_prefixes)) and not k.endswith("num_batches_tracked")
        ]
        if not_fed:
            self.problems.append(f"model tensors missing from the source: {not_fed}")
        for key in ("fc.weight", "fc.bias"):
            if key in self.unused:
                self.unused.discard(key)
                self.report.dropped.append(key)
        if self.unused:
            self.problems.append(f"source keys not used: {sorted(self.unused)}")
        if self.problems:
            raise ValueError("ImageNet initialisation failed:\n  " + "\n  ".join(self.problems))
        self.report.random_init = [k for k, _ in self.net.named_parameters() if k not in self.fed]
        return self.report
