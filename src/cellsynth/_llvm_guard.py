"""Keep triton from loading next to Mesa's software OpenGL, in every process that imports cellsynth.

torch's compiler stack imports triton, whose bundled LLVM crashes the process when Mesa's
llvmpipe (software OpenGL: remote desktops, virtual machines, Xvfb) is already loaded, as it
is once a napari window exists. Nothing in cellsynth uses triton. :func:`install` adds an
import hook that, at the moment something imports triton, looks whether an LLVM library is
already mapped into the process; only then it marks triton as absent (``sys.modules["triton"]
= None``), which torch, diffusers, transformers and timm all handle as "triton not installed".
The hook costs nothing until triton is imported, so it also covers napari's console and
scripts, not only the widgets' worker threads.
"""

from __future__ import annotations

import sys

__all__ = ["avoid_llvm_clash", "install", "llvm_loaded"]


def llvm_loaded() -> bool:
    """Whether an LLVM shared library (as Mesa's llvmpipe brings) is mapped into this process."""
    try:
        with open("/proc/self/maps") as fh:
            return "libLLVM" in fh.read()
    except OSError:  # not Linux: no llvmpipe clash known there
        return False


def avoid_llvm_clash() -> bool:
    """Mark triton as absent now if it is not loaded and LLVM is; return True when it was blocked."""
    if "triton" in sys.modules or not llvm_loaded():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


class _TritonGuard:
    """A meta-path finder that blocks ``import triton`` when LLVM is already loaded."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "triton" and avoid_llvm_clash():
            raise ModuleNotFoundError("triton is disabled next to software OpenGL (LLVM already loaded)",
                                      name="triton")
        return None


def install() -> None:
    """Put the guard first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _TritonGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonGuard())
