"""cakes: Channel-wise Automatic KErnel Shrinking for efficient 3D networks (search → prune → retrain).

Importing the package has no side effects: the entry points register the OmegaConf resolvers
(:func:`cakes.config.register_resolvers`)."""

__version__ = "0.1.0"
