"""Scale-out counting on dask.distributed: folders, plates, time-lapses and images too large for memory.

Core functions of the other packages stay single-image and unaware of dask;
this package plans the work, runs it on a cluster (a local one by default, or
any scheduler address) and writes result tables and plots.

Main entry points
-----------------
count_batch(inputs, out, *, model="default", ...) -> BatchResult
count_large(image, *, model="default", ...) -> CountResult
open_image(path) -> LazyImage
"""

from .engine import BatchParams, BatchResult, cluster_client, count_batch, count_plane
from .lazy import ChunkPlan, chunk_plan, count_large, image_statistics
from .sources import IMAGE_SUFFIXES, LazyImage, find_images, open_image

__all__ = [
    "BatchParams",
    "BatchResult",
    "ChunkPlan",
    "IMAGE_SUFFIXES",
    "LazyImage",
    "chunk_plan",
    "cluster_client",
    "count_batch",
    "count_large",
    "count_plane",
    "find_images",
    "image_statistics",
    "open_image",
]
