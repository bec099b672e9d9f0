"""The CAKES operator library shared by every backbone (video and volumetric)."""

from cakes.ops.conv import CakesConv3d
from cakes.ops.cpu.switch import fast_path, fast_path_enabled, set_fast_path
from cakes.ops.fold import fold_batch_norms
from cakes.ops.factory import ConvNorm, Derived, Homogeneous, OperatorFactory, Uniform, uniform_counts
from cakes.ops.homogeneous import HOMOGENEOUS_OPS, HomogeneousConv3d, SubKernelConv3d
from cakes.ops.search import (
    ChannelSampler,
    CostPriority,
    CostPrioritySlot,
    PerformancePriority,
    PerformancePrioritySlot,
    SearchSlot,
    search_slots,
)
from cakes.ops.per_layer import PerLayer
from cakes.ops.inflate import inflate_2d, inflate_2d_grouped, tile_input_channels
from cakes.ops.subkernel import OP_SETS, OpSet, SubKernel, parse_counts, resolve_op_set

__all__ = [
    "ChannelSampler",
    "CostPriority",
    "CostPrioritySlot",
    "PerformancePriority",
    "PerformancePrioritySlot",
    "SearchSlot",
    "search_slots",
    "CakesConv3d",
    "ConvNorm",
    "fast_path",
    "fold_batch_norms",
    "fast_path_enabled",
    "set_fast_path",
    "Derived",
    "HOMOGENEOUS_OPS",
    "Homogeneous",
    "HomogeneousConv3d",
    "OP_SETS",
    "OpSet",
    "OperatorFactory",
    "PerLayer",
    "SubKernel",
    "SubKernelConv3d",
    "inflate_2d",
    "inflate_2d_grouped",
    "parse_counts",
    "resolve_op_set",
    "tile_input_channels",
    "Uniform",
    "uniform_counts",
]
