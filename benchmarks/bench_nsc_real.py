"""NSC foreground masks on real fluorescence nuclei, against Otsu's threshold.

The development images (``../shared/data/real-nuclei-dev``: five 383x512 nuclear-stain
images with the centre of every nucleus) carry no nucleus outlines, so a mask is judged
two ways:

- ``iou_otsu``: foreground IoU with Otsu's threshold of the same image (the classic
  answer for bright nuclei on a dark background; the reference a user would compare with);
- ``hit``: the fraction of annotated nucleus centres that fall inside the foreground, and
  ``clean``: the fraction of foreground objects of at least a quarter of a nucleus's
  area that hold an annotated centre (1 - the share of false objects);
- ``iou_disks``: foreground IoU with disks of the annotated diameter at every annotated
  centre (a stand-in for the nuclei's outlines), for NSC and for Otsu.

Both are printed for NSC (``--backbone``, default the product's default) and for Otsu
itself, per image and as means, with the NSC time per image.

Run: ``python benchmarks/bench_nsc_real.py [--data DIR] [--backbone filters] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real-nuclei-dev"


def cases(folder: Path):
    """``(name, image, centres, diameter)`` for every row of ``cases.csv``."""
    import tifffile

    with open(folder / "cases.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            image = tifffile.imread(folder / f"{row['name']}.tif")
            with open(folder / f"{row['name']}.csv", newline="") as pf:
                pts = np.array([[float(p["row"]), float(p["col"])] for p in csv.DictReader(pf)]).reshape(-1, 2)
            yield row["name"], image, pts, float(row["diameter_px"])


def otsu_mask(image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float32)
    return img > threshold_otsu(img)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def disks(shape: tuple, centres: np.ndarray, diameter: float) -> np.ndarray:
    """Disks of ``diameter`` at ``centres``: a stand-in for the nuclei where only their centres are annotated."""
    from skimage.draw import disk

    out = np.zeros(shape, bool)
    for c in centres:
        out[disk(tuple(c), diameter / 2, shape=shape)] = True
    return out


def point_scores(mask: np.ndarray, centres: np.ndarray, diameter: float) -> tuple[float, float]:
    """(share of centres inside the mask, share of nucleus-sized objects holding a centre)."""
    from scipy import ndimage as ndi

    rc = np.clip(np.round(centres).astype(int), 0, np.array(mask.shape) - 1)
    hit = float(mask[rc[:, 0], rc[:, 1]].mean()) if len(rc) else 1.0
    objects, n = ndi.label(mask)
    sizes = np.bincount(objects.ravel(), minlength=n + 1)
    big = np.flatnonzero(sizes >= 0.25 * np.pi * (diameter / 2) ** 2)
    big = big[big > 0]
    holding = set(objects[rc[:, 0], rc[:, 1]].tolist())
    clean = float(np.mean([o in holding for o in big])) if len(big) else 1.0
    return hit, clean


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--backbone", default=None, help="NSC backbone (default: NSCParams' default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from cellsynth.stain.nsc import nsc_masks
    from cellsynth.stain.params import NSCParams

    params = NSCParams() if args.backbone is None else NSCParams(backbone=args.backbone)
    rows = []
    for name, image, centres, diameter in cases(args.data):
        t0 = time.perf_counter()
        fg = nsc_masks(image, params=params).foreground
        seconds = time.perf_counter() - t0
        ref = otsu_mask(image)
        nsc_hit, nsc_clean = point_scores(fg, centres, diameter)
        otsu_hit, otsu_clean = point_scores(ref, centres, diameter)
        truth = disks(fg.shape, centres, diameter)
        rows.append(dict(name=name, iou_otsu=iou(fg, ref), nsc_iou_disks=iou(fg, truth),
                         otsu_iou_disks=iou(ref, truth), nsc_hit=nsc_hit, otsu_hit=otsu_hit,
                         nsc_clean=nsc_clean, otsu_clean=otsu_clean, nsc_fraction=float(fg.mean()),
                         otsu_fraction=float(ref.mean()), seconds=seconds))
        r = rows[-1]
        print(f"{name}: IoU with nucleus disks NSC {r['nsc_iou_disks']:.3f}, Otsu {r['otsu_iou_disks']:.3f}; "
              f"IoU with Otsu {r['iou_otsu']:.3f}; centres inside: NSC {nsc_hit:.3f}, Otsu {otsu_hit:.3f}; "
              f"objects holding a centre: NSC {nsc_clean:.3f}, Otsu {otsu_clean:.3f}; foreground NSC "
              f"{r['nsc_fraction']:.3f}, Otsu {r['otsu_fraction']:.3f}; {seconds:.1f} s", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "name"}
    worse = sum(r["nsc_iou_disks"] < r["otsu_iou_disks"] - 0.005 for r in rows)
    print(f"mean over {len(rows)} images (backbone {params.backbone}): IoU with nucleus disks NSC "
          f"{mean['nsc_iou_disks']:.3f} vs Otsu {mean['otsu_iou_disks']:.3f} (NSC worse by more than 0.005 on "
          f"{worse}); IoU with Otsu {mean['iou_otsu']:.3f}; "
          f"centres inside NSC {mean['nsc_hit']:.3f} vs Otsu {mean['otsu_hit']:.3f}; objects holding a centre "
          f"NSC {mean['nsc_clean']:.3f} vs Otsu {mean['otsu_clean']:.3f}; {mean['seconds']:.1f} s per image")
    for source in sorted({r["name"].split("_")[0] for r in rows}):  # each development source on its own
        sel = [r for r in rows if r["name"].split("_")[0] == source]
        print(f"  {source} ({len(sel)} images): IoU with nucleus disks NSC "
              f"{np.mean([r['nsc_iou_disks'] for r in sel]):.3f} vs Otsu {np.mean([r['otsu_iou_disks'] for r in sel]):.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"backbone": params.backbone, "images": rows, "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
