"""napari-cellsynth: synthetic cell layouts, stylization, virtual staining and counting.

Importing ``cellsynth`` is cheap: torch, diffusers, transformers and timm are only
imported by the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
