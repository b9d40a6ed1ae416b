"""stadapter: one frozen ViT backbone, many video tasks through ST-Adapters."""

__version__ = "0.1.0"
