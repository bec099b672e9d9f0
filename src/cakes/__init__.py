"""cakes: Channel-wise Automatic KErnel Shrinking for efficient 3D networks (search → prune → retrain).

Importing the package has no side effects: the entry points register the OmegaConf resolvers
(:func:`cakes.config.register_resolvers`). Importing :mod:`cakes.ops` checks PyTorch's private
entry points on tiny tensors and first raises oneDNN's primitive cache capacities, unless set
(:mod:`cakes.ops.cpu.primitive_cache`)."""

__version__ = "0.1.0"
