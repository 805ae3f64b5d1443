"""The results folder of ``count_batch``: settings manifest, per-plane records, points CSVs, table, plot.

See :mod:`cellsynth.batch.engine` for the folder's layout.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io

_FORMAT = "cellsynth-count-batch"
#: Settings that change the counts (a re-run with other values would not resume the same work).
_RESULT_KEYS = ("model", "model_sha256", "kind", "diameter", "channel", "tile", "overlap", "measure_channels")


def _key(path: Path, index: tuple) -> str:
    h = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return h + ("_p" + "-".join(map(str, index)) if index else "")


def _names(paths: list[Path]) -> dict:
    """A points-CSV name per image: its path below the inputs' common folder, ``/`` as ``__``."""
    resolved = [p.resolve() for p in paths]
    parents = [str(p.parent) for p in resolved]
    root = Path(os.path.commonpath(parents)) if parents else Path("/")
    names, used = {}, set()
    for p, r in zip(paths, resolved):
        rel = r.relative_to(root).as_posix()
        stem = re.sub(r"(\.ome)?\.(tiff?|png|jpe?g|zarr)$", "", rel, flags=re.IGNORECASE)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "__")) or "image"
        if name in used:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.replace("/", "__"))
        used.add(name)
        names[r] = name
    return names


class _Folder:
    """The results folder: manifest, records, points files, table and plot."""

    def __init__(self, out: Path):
        self.out = out
        self.records = out / ".records"
        self.points = out / "points"
        self.manifest = out / "batch.json"
        self.table = out / "counts.csv"
        self.plot = out / "counts.png"

    def check(self, settings: dict, overwrite: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; expected a results folder for count-batch")
        for folder in (out, self.records, self.points):
            io.remove_stale_parts(folder)
        if not out.exists():
            return
        if self.manifest.is_file():
            old = io.read_json(self.manifest)
            if not isinstance(old, dict) or old.get("format") != _FORMAT:
                raise ValueError(f"{self.manifest} was not written by count-batch; choose another --out folder")
            diff = [k for k in _RESULT_KEYS if old.get("settings", {}).get(k) != settings.get(k)]
            if diff and not overwrite:
                was = ", ".join(f"{k}={old.get('settings', {}).get(k)!r}" for k in diff)
                now = ", ".join(f"{k}={settings.get(k)!r}" for k in diff)
                raise FileExistsError(f"{out} holds counts made with {was}, not {now}; pass overwrite=True to "
                                      "recount everything, or choose another --out folder")
        elif any(out.iterdir()):
            raise FileExistsError(f"{out} is not empty and holds no count-batch results (no batch.json); choose an "
                                  "empty or new --out folder")

    def start(self, settings: dict, overwrite: bool) -> None:
        if overwrite and self.records.is_dir():
            for p in self.records.glob("*.json"):
                p.unlink()
        self.records.mkdir(parents=True, exist_ok=True)
        self.points.mkdir(parents=True, exist_ok=True)
        from .. import __version__

        io.write_json(self.manifest, {"format": _FORMAT, "version": 1, "settings": settings,
                                      "cellsynth_version": __version__}, overwrite=True)

    def record(self, key: str) -> Optional[dict]:
        """A plane's record when it is intact, else None."""
        p = self.records / f"{key}.json"
        if not p.is_file():
            return None
        try:
            r = io.read_json(p)
        except (ValueError, OSError):
            return None
        need = ("source", "index", "fingerprint", "count", "points", "scores", "name")
        if not isinstance(r, dict) or any(k not in r for k in need):
            return None
        if r.get("kind") != "regression" and int(r["count"]) != len(r["points"]):
            return None
        if len(r["points"]) != len(r["scores"]):
            return None
        return r

    def is_new(self) -> bool:
        """Whether the folder does not exist yet or is empty (nothing in it to check or resume)."""
        try:
            return not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir()))
        except OSError:
            return False

    def has_records(self) -> bool:
        """Whether any plane was recorded (a re-run may then have nothing to do)."""
        return self.records.is_dir() and any(self.records.glob("*.json"))

    def write_record(self, key: str, rec: dict) -> None:
        io.write_json(self.records / f"{key}.json", rec, overwrite=True)

    def all_records(self) -> list[dict]:
        recs = []
        for p in sorted(self.records.glob("*.json")):
            r = self.record(p.stem)
            if r is not None:
                recs.append(r)
        recs.sort(key=lambda r: (r["name"], r["index"]))
        return recs

    def write_points(self, name: str, recs: list[dict], axes: str, *, overwrite: bool,
                     markers: Optional[dict] = None) -> Path:
        path = self.points / f"{name}.csv"
        stacked = any(r["index"] for r in recs)
        pts, feats = [], {"score": []}
        letters = [a.lower() for a in axes] if stacked else []
        for a in letters:
            feats[a] = []
        for r in recs:
            p = np.asarray(r["points"], float).reshape(-1, 2)
            if stacked:
                p = np.concatenate([np.full((len(p), 1), float(r["plane"])), p], axis=1)
                for a, v in zip(letters, r["index"]):
                    feats[a].extend([v] * len(p))
            pts.append(p)
            feats["score"].extend(r["scores"])
            _point_classes(feats, r, markers)
        points = np.concatenate(pts) if pts else np.zeros((0, 3 if stacked else 2))
        return io.write_points_csv(path, points, features=feats, overwrite=overwrite)


def _point_classes(feats: dict, rec: dict, markers: Optional[dict]) -> None:
    """Append one plane's ``mean_<name>`` and ``class`` per point to ``feats`` (nothing without measurements)."""
    if not markers or "means" not in rec:
        return
    from ..count.markers import auto_thresholds, classify

    means = np.asarray(rec["means"], float).reshape(-1, len(markers["names"]))
    thresholds = markers["thresholds"]
    if thresholds is None:
        try:
            thresholds = auto_thresholds(means)
        except ValueError:
            thresholds = None
    for k, n in enumerate(markers["names"]):
        feats.setdefault(f"mean_{n}", []).extend(means[:, k].tolist())
    feats.setdefault("class", []).extend(classify(means, thresholds, markers["names"]).tolist()
                                         if thresholds is not None else [""] * len(means))


def _marker_columns(rec: dict, markers: Optional[dict]) -> dict:
    """The marker classes of one plane's record: counts, percentages and thresholds (see ``class_columns``)."""
    if not markers or "means" not in rec or rec.get("kind") == "regression":
        return {}
    from ..count.markers import class_columns

    return class_columns(np.asarray(rec["means"], float), markers["thresholds"], markers["names"])


def _rows(recs: list[dict], regions=None, markers: Optional[dict] = None) -> list[dict]:
    """The rows of ``counts.csv``; with ``regions``, the cells of each plane in each (columns ``in <region>``);
    with ``markers``, the nuclei of each marker class (``<class>``, ``<class> %``, ``threshold <name>``)."""
    rows = []
    masks: dict = {}
    for r in recs:
        rows.append({
            "image": r["source"],
            "points_csv": f"points/{r['name']}.csv",
            **_in_regions(r, regions, masks),
            "plane": r["plane"],
            "stack_index": " ".join(f"{a}{v}" for a, v in zip(r.get("axes", ""), r["index"])),
            "count": r["count"],
            "diameter": None if r.get("diameter") is None else round(float(r["diameter"]), 3),
            "diameter_source": r.get("diameter_source"),
            "model": r.get("model"),
            "lazy": bool(r.get("lazy")),
            "seconds": r.get("seconds"),
            **_marker_columns(r, markers),
        })
    return rows


def _in_regions(rec: dict, regions, masks: dict) -> dict:
    """``{"in <region>": cells}`` of one plane's record (empty without regions or positions)."""
    if not regions or "shape" not in rec or rec.get("kind") == "regression":
        return {}
    from ..count.regions import count_in_regions, region_masks

    shape = tuple(int(v) for v in rec["shape"])
    if shape not in masks:
        try:
            masks[shape] = region_masks(regions, shape)
        except ValueError:  # a region outside this image's size: no count there, the others are kept
            masks[shape] = None
    if masks[shape] is None:
        return {f"in {region.name}": None for region in regions}
    rows = count_in_regions(np.asarray(rec["points"], float).reshape(-1, 2), regions, shape, masks=masks[shape])
    return {f"in {row['region']}": row["count"] for row in rows}


def _write_table(path: Path, rows: list[dict]) -> Path:
    cols = ["image", "plane", "stack_index", "count", "diameter", "diameter_source", "model", "lazy", "seconds",
            "points_csv"]
    cols += list(dict.fromkeys(k for r in rows for k in r if k not in cols))  # regions, marker classes
    with io.atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
    return path


def _prepare_plot() -> bool:
    """Import what :func:`_write_plot` draws with (about half a second), e.g. while the last planes are counted."""
    import matplotlib
    import matplotlib.backends.backend_agg  # noqa: F401 (what savefig draws PNGs with)
    import matplotlib.figure  # noqa: F401

    return True


def _write_plot(path: Path, rows: list[dict]) -> Path:
    """Counts per image (bars), or count over planes per image (lines) when there are stacks."""
    _prepare_plot()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    if any(len(v) > 1 for v in by_image.values()):
        for img, rs in list(by_image.items())[:20]:
            rs = sorted(rs, key=lambda r: r["plane"])
            ax.plot([r["plane"] for r in rs], [float(r["count"]) for r in rs], marker=".", label=Path(img).name)
        ax.set_xlabel("plane (frame)")
        if len(by_image) <= 10:
            ax.legend(fontsize="small")
    else:
        names = [Path(k).name for k in by_image]
        counts = [float(v[0]["count"]) for v in by_image.values()]
        ax.set_xlabel("image")
        if len(names) <= 30:
            ax.bar(range(len(counts)), counts, color="tab:blue")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
        else:  # one filled outline instead of a patch per image (100 bars take 0.16 s to place, 10,000 half a minute)
            ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color="tab:blue")
    ax.set_ylabel("cells")
    ax.set_title(f"Cell counts ({len(rows)} planes, {len(by_image)} images)")
    fig.tight_layout()
    with io.atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ----------------------------------------------------------------------------- the batch
