"""On-disk data helpers: :mod:`cakes.data.synthetic_video` writes a synthetic SSV1 dataset."""
