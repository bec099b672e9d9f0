"""cakes: Channel-wise Automatic KErnel Shrinking for efficient 3D networks (search → prune → retrain)."""

from cakes.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
