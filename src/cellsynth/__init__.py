"""napari-cellsynth: synthetic cell layouts, stylization, virtual staining and counting.

Importing ``cellsynth`` is cheap: torch, diffusers, transformers and timm are only
imported by the functions that need them.
"""

__version__ = "0.1.0"

from ._llvm_guard import install as _install_llvm_guard  # noqa: E402

_install_llvm_guard()  # triton must never load next to software OpenGL (see _llvm_guard)

__all__ = ["__version__"]
