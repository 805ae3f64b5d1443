"""Counting shared by the "Count cells" and "Counting loop" widgets.

The result of a count is a Points layer "<image> cells" with features ``score``,
``source`` ("model" / "manual") and ``id`` (the model point's index, -1 for
points added by hand). Its ``metadata["points_store"]`` keeps every point the
model found, so that the score threshold can hide points and show them again,
and the model points a person deleted by hand (``deleted``: their coordinates),
so that neither the threshold nor a re-run brings them back. A re-run keeps the
points added by hand and leaves out new model points that fall on one of them or
on a deleted point.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Optional, Union

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSpinBox
from napari.layers import Image, Points

from ._layers import provenance, upsert_layer

__all__ = ["COLORS", "LEGEND", "DiameterField", "apply_threshold", "channel_count", "count_text", "count_work",
           "current_frame", "image_data", "plane_shape", "prepare_counter", "refresh_count", "result_name", "show_points",
           "style_as_count"]

STORE = "points_store"
COLORS = {"model": "yellow", "manual": "cyan"}
LEGEND = ("<span style='color:yellow'>&#9711;</span> found by the model &nbsp; "
          "<span style='color:cyan'>&#9711;</span> added by you &nbsp; (ring = the diameter used)")


#: Tiles per forward pass in the widgets: the bar moves and Cancel can act every few tiles.
TILES_PER_STEP = 4


def result_name(image_name: str) -> str:
    """Name of the Points layer holding the cells counted in ``image_name``."""
    return f"{image_name} cells"


# -- inputs ------------------------------------------------------------------------

def image_data(layer: Image) -> np.ndarray:
    """The layer's pixels (the finest level of a multiscale image)."""
    return np.asarray(layer.data if not layer.multiscale else layer.data[0])


def plane_shape(layer: Image) -> tuple:
    """``(rows, cols)`` of an image layer's planes, without reading its pixels (colour samples left out)."""
    shape = np.shape(layer.data[0] if layer.multiscale else layer.data)
    return tuple(shape[-3:-1] if channel_count(layer) else shape[-2:])


def channel_count(layer: Optional[Image]) -> int:
    """Number of channels a counter can choose from: 0 for a one-channel image."""
    if layer is None:
        return 0
    shape = np.shape(layer.data if not layer.multiscale else layer.data[0])
    if layer.rgb or (len(shape) == 3 and shape[-1] <= 4):
        return int(shape[-1])
    return 0


class DiameterField(Container):
    """"estimate the diameter" (checked by default) and the diameter in pixels, which a person may type.

    Typing a diameter unchecks the box; after a run the diameter used is shown in the
    field without unchecking it.
    """

    def __init__(self) -> None:
        self.auto = CheckBox(value=True, text="estimate it from the image",
                             tooltip="checked: each run measures the typical cell size in the image; "
                                     "uncheck (or type a diameter) to count at the diameter below")
        self.value = FloatSpinBox(label="cell diameter (px)", value=0.0, min=0.0, max=1000.0, step=0.5,
                                  tooltip="typical cell diameter in pixels; typing one here turns the estimate off")
        self.value.native.setSpecialValueText("auto")  # shown while no diameter is known yet
        super().__init__(widgets=[self.auto, self.value], labels=True)
        self._quiet = False
        self.value.changed.connect(self._typed)

    def _typed(self, *_: Any) -> None:
        if not self._quiet:
            self.auto.value = not self.value.value

    def arg(self) -> Union[str, float]:
        """``"auto"`` or the typed diameter, as :func:`cellsynth.count.count_cells` takes it."""
        return "auto" if self.auto.value or not self.value.value else float(self.value.value)

    def show(self, diameter: Optional[float], *, auto: Optional[bool] = None) -> None:
        """Show a diameter (the one used or estimated) without turning the estimate off."""
        if diameter is not None and np.isfinite(diameter) and diameter > 0:
            self._quiet = True
            try:
                self.value.value = round(float(diameter), 1)
            finally:
                self._quiet = False
        if auto is not None:
            self.auto.value = auto


#: The one-time preparations of counters started by the docks in this session: model -> process.
_PREPARING: dict = {}


def prepare_counter(model: str) -> Optional[subprocess.Popen]:
    """Start the one-time ONNX export of ``model`` in another process, once per session (None: not needed).

    A first count on a new computer otherwise builds and exports the network
    before counting (most of its time), in the window's own interpreter. The
    docks call this when they open; a count started meanwhile waits for it and
    says so (:func:`count_work`). Nothing starts for the classic counter; the
    process does nothing when counting does not use onnxruntime or exports are
    kept in memory only (``$CELLSYNTH_ONNX_CACHE`` empty).
    """
    if model in ("classic", "file") or not model or model in _PREPARING:
        return _PREPARING.get(model)
    # whether an export is needed and kept is decided in that process: importing the count package here
    # (scipy) would hold the window ~0.4 s as the dock opens
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cellsynth.count._prepare", str(model)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # the count exports as before
        return None
    _PREPARING[model] = proc
    return proc


def _wait_prepared(model: str, progress) -> None:
    """Wait (with a message, and Cancel) for a preparation of ``model`` that a dock started."""
    from ..progress import report

    proc = _PREPARING.get(model)
    t0 = time.monotonic()
    while proc is not None and proc.poll() is None:
        report(progress, "loading the counter", 0, 1,
               f"preparing the counter for this computer, once ({time.monotonic() - t0:.0f} s)")
        time.sleep(0.2)


def count_work(image: np.ndarray, *, model: str, diameter, channel: Optional[int], device: str):
    """The function a TaskRunner runs to count: returns ``(counter, CountResult)``."""

    def work(progress):
        from ..count import count_cells, load_counter
        from ..progress import report

        _wait_prepared(model, progress)
        report(progress, "loading the counter", 0, 1)
        counter = load_counter(model, device=device)
        result = count_cells(image, counter=counter, diameter=diameter, channel=channel, device=device,
                             batch_size=TILES_PER_STEP, progress=progress)
        if counter.kind != "regression" and result.meta.get("diameter_used") and len(result.points):
            from ..count.objects import nucleus_areas

            report(progress, "measuring the nuclei", 0, 1)
            result.areas = nucleus_areas(image, result.points, diameter=float(result.meta["diameter_used"]),
                                         channel=channel)
        return counter, result

    return work


# -- the result layer ----------------------------------------------------------------

def _source(layer: Points) -> np.ndarray:
    if "source" not in layer.features or len(layer.features) != len(layer.data):
        return np.array(["manual"] * len(layer.data))
    return layer.features["source"].astype(str).to_numpy()


def _ids(layer: Points) -> np.ndarray:
    if "id" not in layer.features or len(layer.features) != len(layer.data):
        return np.full(len(layer.data), -1)
    return layer.features["id"].fillna(-1).astype(int).to_numpy()


def _store(layer: Points) -> Optional[dict]:
    store = layer.metadata.get(STORE)
    return store if isinstance(store, dict) and "points" in store else None


def _note_edits(layer: Points, store: dict) -> None:
    """Record model points deleted by hand since the layer was last built; keep moved points where they are."""
    ids = _ids(layer)
    present = {int(i): k for k, i in enumerate(ids) if i >= 0}
    expected = _visible(store)
    missing = [int(i) for i in expected if int(i) not in present]
    for i, k in present.items():
        if 0 <= i < len(store["points"]):
            store["points"][i] = np.asarray(layer.data[k], dtype=float)
    if missing:
        store["hidden"] = np.union1d(store["hidden"], missing).astype(int)
        store["deleted"] = np.concatenate([store["deleted"], store["points"][missing]], axis=0)


def _visible(store: dict) -> np.ndarray:
    """Indices of the model points shown: score at or above the threshold, not deleted (nor cut by the border
    when those are left out)."""
    keep = np.asarray(store["scores"]) >= float(store["threshold"])
    keep[np.asarray(store["hidden"], dtype=int)] = False
    if store.get("exclude_border") and len(store.get("border", ())) == len(keep):
        keep &= ~np.asarray(store["border"], bool)
    return np.flatnonzero(keep)


def _layer_rows(store: dict, manual_pts: np.ndarray, manual_scores: np.ndarray):
    vis = _visible(store)
    ndim = store["points"].shape[1]
    pts = np.concatenate([store["points"][vis].reshape(-1, ndim), manual_pts.reshape(-1, ndim)], axis=0)
    features = {"score": np.concatenate([np.asarray(store["scores"])[vis], manual_scores]).astype(float),
                "source": np.array(["model"] * len(vis) + ["manual"] * len(manual_pts), dtype=object),
                "id": np.concatenate([vis, np.full(len(manual_pts), -1)]).astype(int)}
    if "areas" in store:  # the nucleus object's area, model points only (a point added by hand has none measured)
        features["area_px"] = np.concatenate([np.asarray(store["areas"])[vis], np.full(len(manual_pts), np.nan)])
    return pts, features


def _manual(layer: Points) -> tuple[np.ndarray, np.ndarray]:
    m = _source(layer) == "manual"
    scores = layer.features["score"].to_numpy(dtype=float)[m] if "score" in layer.features and \
        len(layer.features) == len(layer.data) else np.ones(int(m.sum()))
    return np.asarray(layer.data, dtype=float)[m], scores


def apply_threshold(layer: Points, threshold: Optional[float] = None, *, exclude_border: Optional[bool] = None) -> None:
    """Show the model points scoring at least ``threshold`` (and every point added by hand).

    ``exclude_border`` (when not None) also leaves out, or brings back, the model
    points of nuclei cut by the image border. None keeps the current setting.
    """
    store = _store(layer)
    if store is None:
        return
    _note_edits(layer, store)
    manual_pts, manual_scores = _manual(layer)
    if threshold is not None:
        store["threshold"] = float(threshold)
    if exclude_border is not None:
        store["exclude_border"] = bool(exclude_border)
    pts, features = _layer_rows(store, manual_pts, manual_scores)
    layer.data = pts
    layer.features = features
    layer.metadata = {**layer.metadata, STORE: store}
    refresh_count(layer)


def _near(points: np.ndarray, others: np.ndarray, radius: float) -> np.ndarray:
    """Which of ``points`` lie within ``radius`` of any of ``others``."""
    if len(points) == 0 or len(others) == 0:
        return np.zeros(len(points), bool)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(others).query(points, k=1)
    return dist <= radius


def show_points(viewer, image_layer: Image, counter, result, *, parameters: dict) -> Points:
    """Add or update the Points layer of a count, keeping what a person changed by hand.

    Returns the layer; ``metadata["last_run"]`` says how many points added by hand were
    kept and how many new model points were left out because a person had deleted them.
    """
    name = result_name(image_layer.name)
    ndim = np.shape(result.points)[1] if np.ndim(result.points) == 2 else 2
    pts = np.asarray(result.points, dtype=float).reshape(-1, ndim)
    scores = np.asarray(result.scores, dtype=float).reshape(len(pts))
    diameter = result.meta.get("diameter_used") or getattr(counter, "diameter", None) or 10.0
    radius = 0.5 * float(diameter)

    old = viewer.layers[name] if name in viewer.layers and isinstance(viewer.layers[name], Points) else None
    manual_pts, manual_scores = np.zeros((0, ndim)), np.zeros(0)
    deleted, threshold, exclude_border = np.zeros((0, ndim)), 0.0, False
    if old is not None and np.shape(old.data)[1] == ndim:
        old_store = _store(old)
        if old_store is not None:
            _note_edits(old, old_store)
            deleted = np.asarray(old_store["deleted"], dtype=float).reshape(-1, ndim)
            threshold = float(old_store["threshold"])
            exclude_border = bool(old_store.get("exclude_border", False))
        manual_pts, manual_scores = _manual(old)
    on_deleted = _near(pts, deleted, radius)
    on_manual = _near(pts, manual_pts, radius) & ~on_deleted
    from ..count.metrics import cut_by_border

    plane = plane_shape(image_layer)
    store = {"points": pts, "scores": scores, "threshold": threshold,
             "hidden": np.flatnonzero(on_deleted | on_manual).astype(int), "deleted": deleted,
             "border": cut_by_border(pts, plane, radius=radius), "exclude_border": exclude_border}
    if getattr(result, "areas", None) is not None and len(result.areas) == len(pts):
        store["areas"] = np.asarray(result.areas, dtype=float)
    data, features = _layer_rows(store, manual_pts, manual_scores)

    source = getattr(getattr(image_layer, "source", None), "path", None)
    meta = provenance("count", input=image_layer.name, parameters=parameters,
                      **({"source_path": str(source)} if source else {}),
                      **{k: v for k, v in result.meta.items() if k != "operation"})
    meta.update({STORE: store, "diameter_used": float(diameter),
                 "diameter_source": result.meta.get("diameter_source", "given"),
                 "density_sum": result.density_sum,
                 "last_run": {"kept_manual": int(len(manual_pts)), "left_out_deleted": int(on_deleted.sum()),
                              "left_out_on_manual": int(on_manual.sum())}})
    defaults = {"score": 1.0, "source": "manual", "id": -1, **({"area_px": np.nan} if "areas" in store else {})}
    layer = upsert_layer(viewer, name, "points", data, metadata=meta, features=features, like=image_layer,
                         feature_defaults=defaults, size=float(diameter), face_color="transparent", border_color="source",
                         border_color_cycle=COLORS, border_width=0.12, border_width_is_relative=True)
    if not np.all(np.asarray(layer.size) == float(diameter)):
        layer.size = float(diameter)
    if layer.current_size != float(diameter):
        layer.current_size = float(diameter)
    layer.feature_defaults = defaults  # new points added by hand are "manual"
    refresh_count(layer)
    return layer


def refresh_count(layer: Points) -> int:
    """Store the number of points in ``metadata["count"]`` and return it."""
    n = int(len(layer.data))
    if layer.metadata.get("count") != n:
        layer.metadata = {**layer.metadata, "count": n}
    return n


def style_as_count(layer: Points) -> bool:
    """Draw a Points layer opened by another reader (napari's own draws filled white discs) as count rings.

    Only a layer that still has napari's default look is changed; returns whether it was.
    """
    face = np.asarray(layer.face_color, float)
    if len(face) == 0 or not np.allclose(face, 1.0):
        return False
    layer.face_color = "transparent"
    layer.border_width_is_relative = True
    layer.border_width = 0.12
    if "source" in layer.features and len(layer.features) == len(layer.data):
        layer.border_color_cycle = COLORS  # as show_points draws a count: yellow from the model, cyan by hand
        layer.border_color = "source"
    else:
        layer.border_color = "yellow"
    return True


def current_frame(layer: Points, viewer) -> Optional[tuple]:
    """The stack index (leading data coordinates) of ``layer`` shown now, or None for a 2D layer."""
    ndim = int(layer.ndim)
    if ndim <= 2:
        return None
    point = np.asarray(layer.world_to_data(viewer.dims.point[-ndim:]), float)
    return tuple(int(round(v)) for v in point[: ndim - 2])


def count_text(layer: Points, frame: Optional[tuple] = None) -> str:
    """What the widgets show about a count layer: the count, then the scale and what was kept.

    For a stack, ``frame`` (see :func:`current_frame`) is the frame shown: its
    count comes first, the total over the frames after it.
    """
    n = len(layer.data)
    source = _source(layer)
    manual = int(np.count_nonzero(source == "manual"))
    if frame is not None and n and np.shape(layer.data)[1] > 2:
        lead = np.rint(np.asarray(layer.data, float)[:, : len(frame)]).astype(int)
        here = np.all(lead == np.asarray(frame, int), axis=1)
        n_here, manual_here = int(here.sum()), int(np.count_nonzero(source[here] == "manual"))
        frames = len({tuple(r) for r in lead})
        name = " ".join(map(str, frame))
        lines = [f"Count: {n_here} in frame {name} ({n_here - manual_here} from the model, {manual_here} added by "
                 f"hand); {n} in {frames} frame{'s' if frames != 1 else ''} with cells"]
    else:
        lines = [f"Count: {n} ({n - manual} from the model, {manual} added by hand)"]
    meta = layer.metadata
    details = []
    if meta.get("diameter_used"):
        details.append(f"diameter {meta['diameter_used']:.1f} px ({meta.get('diameter_source', 'given')})")
    if meta.get("density_sum") is not None:
        details.append(f"density sum {meta['density_sum']:.1f}")
    store = _store(layer)
    if store is not None and store["threshold"] > 0:
        below = int(np.count_nonzero(np.asarray(store["scores"]) < store["threshold"]))
        details.append(f"{below} below score {store['threshold']:.2f} hidden")
    n_border = int(np.count_nonzero(store.get("border", []))) if store is not None else 0
    if n_border:
        details.append(f"{n_border} cut by the border " + ("left out" if store.get("exclude_border") else "counted"))
    if details:
        lines.append(" · ".join(details))
    run = meta.get("last_run") or {}
    kept = []
    if run.get("kept_manual"):
        kept.append(f"kept {run['kept_manual']} points you added")
    if run.get("left_out_deleted"):
        kept.append(f"left out {run['left_out_deleted']} you had deleted")
    if kept:
        lines.append(" and ".join(kept))
    return "\n".join(lines)
