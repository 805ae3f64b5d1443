"""``cellsynth layouts``: export a dataset of Syn-HC layouts."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .params import LayoutParams

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser(
        "layouts",
        help="generate a dataset of synthetic cell layouts",
        description="Write N Syn-HC layouts (image TIFF, label TIFF, centres CSV, manifest.json) to a folder. "
        "An interrupted export of the same settings resumes; a folder holding anything else is refused "
        "unless --overwrite is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, required=True, help="number of layouts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="base seed (item i uses a seed derived from it)")
    p.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="image size (default 256 256)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")
    p.add_argument("--scheduler", "--dask-scheduler", dest="dask_scheduler", default=None, metavar="local|ADDRESS",
                   help="generate on dask.distributed: 'local' (a local cluster of processes) or the address of a "
                        "running scheduler, e.g. tcp://host:8786 (default: in this process)")
    p.add_argument("--workers", type=int, default=None,
                   help="local dask worker processes (implies --scheduler local; default: one per core)")
    for f in dataclasses.fields(LayoutParams):
        if f.name == "shape":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=type(f.default[0]), nargs=2, metavar=("LOW", "HIGH"), default=f.default,
                           help=help_text)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=help_text)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .._cluster import cluster_args
    from ..progress import tqdm_callback
    from .dataset import export_dataset, read_dataset

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(LayoutParams) if f.name != "shape"}
    if args.size is not None:
        values["shape"] = tuple(args.size)
    params = LayoutParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    callback, close = tqdm_callback()
    try:
        manifest = export_dataset(args.out, args.n, params=params, seed=args.seed, overwrite=args.overwrite,
                                  progress=callback, **cluster_args(args.dask_scheduler, args.workers))
    finally:
        close()
    counts = read_dataset(manifest).counts()
    print(f"wrote {len(counts)} layouts to {manifest.parent} "
          f"({counts.mean():.1f} +- {counts.std():.1f} cells per image)", file=sys.stdout)
    return 0
