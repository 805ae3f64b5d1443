"""``cellsynth count-batch``: count folders, plates, time-lapses and large images on dask.distributed.

:func:`register` adds the subcommand to an argparse subparsers object. The
summary goes to stdout (one JSON object with ``--json``), progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from .._cluster import cluster_args
from .lazy import LARGE_PIXELS

__all__ = ["register", "cluster_args"]  # cluster_args: re-exported from where it lived before


def _workers(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of workers, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 worker, got {text!r}")
    return v


def register(subparsers) -> None:
    """Add ``count-batch`` to ``subparsers``."""
    from .._cli_types import add_marker_options
    from .._cli_types import diameter_or_auto as _diameter

    p = subparsers.add_parser(
        "count-batch", help="count cells in many images (folders, stacks, large images) on a dask cluster",
        description="Count every plane of every image on a dask.distributed cluster (a local one by default). "
                    "Writes OUT/counts.csv, OUT/counts.png and one points CSV per image under OUT/points/. "
                    "A re-run skips what is done; nothing is replaced without --overwrite.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or glob patterns: TIFF/OME-TIFF, OME-Zarr, "
                        "PNG, JPEG")
    p.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results folder (created when missing)")
    p.add_argument("--model", default="default", help="'default', 'classic' or a model folder/file (default: default)")
    p.add_argument("--diameter", type=_diameter, default="auto",
                   help="cell diameter in pixels, or 'auto' to estimate it for each plane (default: auto)")
    p.add_argument("--channel", type=int, default=None, help="channel of multichannel images (default: max over channels)")
    p.add_argument("--device", default="auto", help="device on the workers: auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default tile/8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per forward pass (default: 2 on the CPU, 8 on a GPU)")
    p.add_argument("--large-pixels", type=int, default=LARGE_PIXELS,
                   help="planes with more pixels are counted in chunks, never read whole (default 4096*4096)")
    p.add_argument("--regions", default=None, metavar="FILE",
                   help="regions in every image's pixels (napari shapes CSV or GeoJSON, e.g. well quadrants): "
                        "counts.csv gets the cells of each plane in each region (columns 'in <region>')")
    add_marker_options(p, per="plane")
    p.add_argument("--scheduler", default="local",
                   help="'local' (a new local cluster of processes) or the address of a running dask scheduler, "
                        "e.g. tcp://host:8786 (default: local)")
    p.add_argument("--workers", type=_workers, default=None,
                   help="local worker processes (default: one per core, as memory allows)")
    p.add_argument("--threads-per-worker", type=_workers, default=1, help="threads of each local worker (default 1)")
    p.add_argument("--overwrite", action="store_true", help="recount everything and replace earlier results in --out")
    p.add_argument("--json", action="store_true", help="print one JSON object with the summary and the table rows")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_count_batch)


def _count_batch(args) -> int:
    from ..io import json_default
    from ..progress import tqdm_callback
    from .engine import BatchParams, count_batch

    params = BatchParams(model=args.model, diameter=args.diameter, channel=args.channel, device=args.device,
                         tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                         large_pixels=args.large_pixels, regions=args.regions,
                         measure_channels=args.measure_channels, thresholds=args.thresholds,
                         marker_names=args.marker_names)
    if args.scheduler != "local" and args.workers is not None:
        raise ValueError("--workers applies to --scheduler local; size a remote cluster where it runs")
    cb, close = tqdm_callback(disable=bool(args.quiet))
    try:
        res = count_batch(args.inputs, args.out, params=params, scheduler=args.scheduler, workers=args.workers,
                          threads_per_worker=args.threads_per_worker, overwrite=args.overwrite, progress=cb)
    finally:
        close()
    for line in res.errors:
        print(f"error: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({"counted": res.counted, "skipped": res.skipped, "errors": res.errors,
                          "workers": res.workers, "seconds": res.seconds, "table": res.table, "plot": res.plot,
                          "rows": res.rows}, default=json_default, allow_nan=False))
    else:
        total = sum(float(r["count"]) for r in res.rows)
        images = len({r["image"] for r in res.rows})
        print(f"{res.counted} planes counted, {res.skipped} already done, {len(res.errors)} failed "
              f"({res.workers} workers, {res.seconds:.1f} s)")
        print(f"{len(res.rows)} planes of {images} images, {total:g} cells: {res.table}"
              + (f", {res.plot}" if res.plot else ""))
    return 2 if res.errors else 0
