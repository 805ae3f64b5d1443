"""Counters as bioimage.io model packages: export, and load packages this product made.

:func:`export_counter` writes a density or regression counter as a bioimage.io
model package (a ``.zip`` with ``rdf.yaml``, spec 0.5): the weights as
``pytorch_state_dict`` (architecture: the network module itself, shipped in the
package) and, where the network traces, as TorchScript; the input scaling as
bioimage.io preprocessing (percentiles per image, then clipping); a density
output scaled so that its sum over a region is the number of cells there; the
cell diameter the model expects, the training data's provenance and the whole
counter config in the description and under ``config.cellsynth``; a test input
(a crop of a real nuclei image by default) with the counter's own output for it.
The package is validated with ``bioimageio.spec`` and, unless ``check=False``,
run against its test tensors with ``bioimageio.core`` before it is written.

:func:`load_package_counter` reads such a package back into a
:class:`~cellsynth.count.models.Counter` without unpickling code
(``torch.load(weights_only=True)``) and without needing bioimageio installed.
Packages made by other tools are refused with a pointer to ``bioimageio.core``.

``bioimageio.spec`` / ``bioimageio.core`` (the ``bioimageio`` extra) are needed
for export only and imported inside the functions.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import io
from .counter import CounterConfig
from .packages import CONFIG_KEY, is_counter_package, load_package_counter  # re-exported: the public names

__all__ = ["export_counter", "load_package_counter", "is_counter_package", "ExportResult", "CONFIG_KEY"]

INPUT_ID = "raw"
OUTPUT_ID = "density"
_ARCH_FILE = "cellsynth_counter_nets.py"
_STATE_FILE = "weights.pt"
_TS_FILE = "weights_torchscript.pt"
_EXTRA_HINT = "install the bioimageio extra: pip install 'napari-cellsynth[bioimageio]'"


@dataclass
class ExportResult:
    """What :func:`export_counter` wrote.

    Attributes
    ----------
    path : Path
        The package file.
    weight_formats : list of str
        ``pytorch_state_dict`` and, where the network traces, ``torchscript``.
    test : dict or None
        bioimageio.core's test summary (``status`` and per-check ``details``), or
        None when not run.
    notes : list of str
        Why a weight format was left out, if any.
    """

    path: Path
    weight_formats: list
    test: Optional[dict]
    notes: list


def _require_bioimageio():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"exporting bioimage.io packages needs bioimageio.spec; {_EXTRA_HINT}") from exc


def _default_test_image() -> np.ndarray:
    """A 128x128 crop of the shipped real nuclei image (many nuclei, not sparse)."""
    from ..weights import resources_dir

    img, _ = io.read_tiff(resources_dir() / "samples" / "neurocyte_010.tif")
    img = np.asarray(img)
    if img.ndim == 3:
        img = img.max(axis=-1) if img.shape[-1] <= 4 else img[0]
    r0, c0 = (img.shape[0] - 128) // 2, (img.shape[1] - 128) // 2
    return img[r0:r0 + 128, c0:c0 + 128]


def _scale_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """bioimage.io's ``scale_range`` then ``clip(-1, 5)``, as a consumer will run it."""
    lo, hi = np.percentile(x.astype(np.float64), [low, high])
    return np.clip((x - lo) / (hi - lo + 1e-6), -1.0, 5.0).astype(np.float32)


def _prepare_test_input(image: Optional[np.ndarray], cfg: dict, stride: int) -> np.ndarray:
    from .preprocess import counter_input as _normalize

    img = _default_test_image() if image is None else np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"the test image must be one 2D plane, got shape {img.shape}")
    rows, cols = (img.shape[0] // stride) * stride, (img.shape[1] // stride) * stride
    if min(rows, cols) < 2 * stride:
        raise ValueError(f"the test image must be at least {2 * stride}x{2 * stride} pixels, got {img.shape}")
    img = img[:rows, :cols].astype(np.float32)
    norm = cfg.get("normalize", {})
    if norm.get("mode") == "fixed":
        return np.clip(np.rint(img), 0, 255)
    ours = _normalize(img, norm)
    theirs = _scale_range(img, norm.get("low", 1.0), norm.get("high", 99.8))
    if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        raise ValueError("the test image is too sparse: its percentile scaling differs from bioimage.io's "
                         "scale_range (the counter widens the range of nearly empty images); choose a test "
                         "image with more cells")
    return img


def _preprocessing(cfg: dict) -> list:
    from bioimageio.spec.model import v0_5 as m

    norm = cfg.get("normalize", {})
    if norm.get("mode") == "fixed":
        span = 255.0
        return [m.ScaleLinearDescr(kwargs=m.ScaleLinearKwargs(
            gain=1.0 / (span * float(norm["std"])), offset=-float(norm["mean"]) / float(norm["std"])))]
    return [
        m.ScaleRangeDescr(kwargs=m.ScaleRangeKwargs(
            axes=[m.AxisId("y"), m.AxisId("x")], min_percentile=float(norm.get("low", 1.0)),
            max_percentile=float(norm.get("high", 99.8)))),
        m.ClipDescr(kwargs=m.ClipKwargs(min=-1.0, max=5.0)),
    ]


def _preprocess(x: np.ndarray, cfg: dict) -> np.ndarray:
    """The counter's own input scaling of the raw test input (8-bit range for fixed scaling)."""
    from .preprocess import counter_input as _normalize

    norm = cfg.get("normalize", {})
    if norm.get("mode") == "fixed":
        return _normalize(np.clip(np.rint(x), 0, 255).astype(np.uint8), norm)
    return _normalize(x, norm)


def _reference_output(counter, x: np.ndarray) -> np.ndarray:
    """The counter's own output for the raw test input, in the package's units."""
    import torch

    plane = _preprocess(x, counter.config)
    net = counter.net.float().cpu().eval()
    with torch.no_grad():
        y = net(torch.from_numpy(plane)[None, None]).numpy().astype(np.float32)
    if counter.kind == "density":
        return y / np.float32(counter.settings.density_scale)
    return y.reshape(1, 1)


def _describe(counter, *, name: str, diameter: float) -> tuple[str, str]:
    cfg = counter.config
    training = cfg.get("training") or {}
    prov = training.get("data") or (
        f"{training.get('n_train', 0)} labelled images, {training.get('n_synthetic', 0)} synthetic, "
        f"{training.get('n_unlabelled', 0)} unlabelled (strategy "
        f"{(training.get('config') or {}).get('strategy', 'unknown')})" if training else "not recorded")
    what = ("a cell-density map (cells per pixel: its sum over a region is the number of cells there; "
            "cell positions are its local maxima)" if counter.kind == "density"
            else "one cell count per input window")
    short = (f"Cell counter ({counter.kind}, EfficientNet backbone) for nuclei of about {diameter:g} px "
             f"in diameter; outputs {what}.")
    norm = cfg.get("normalize", {})
    pre = ("8-bit intensities scaled as (x/255 - mean)/std" if norm.get("mode") == "fixed" else
           f"per-image percentiles {norm.get('low', 1.0)} -> 0 and {norm.get('high', 99.8)} -> 1, clipped to [-1, 5]")
    doc = "\n".join([
        f"# {name}", "", short, "",
        "## Input", f"One grey plane (`{INPUT_ID}`: batch, channel, y, x); multichannel images: pass the nuclear "
        f"channel. Preprocessing: {pre}.", "",
        "## Scale", f"The model expects nuclei of about **{diameter:g} pixels** in diameter. Rescale images whose "
        f"nuclei are larger or smaller by diameter / {diameter:g} before running it, and scale the output back.", "",
        "## Output", f"`{OUTPUT_ID}`: {what}.", "",
        "## Training data", f"{prov}.", "",
        "## Provenance", f"Exported by napari-cellsynth from `{counter.name}` (weights sha256 "
        f"{counter.sha256 or 'n/a'}). The whole counter config is under `config.{CONFIG_KEY}`; "
        "`cellsynth count IMAGE --model PACKAGE.zip` runs it with the product's own tiling, scale "
        "estimation and peak finding.", "",
    ])
    return short, doc


def _training_details(cfg: dict):
    from bioimageio.spec.model import v0_5 as m

    tc = (cfg.get("training") or {}).get("config") or {}
    t = cfg.get("training") or {}
    return m.TrainingDetails(
        training_epochs=tc.get("epochs") or t.get("epoch"),
        training_batch_size=tc.get("batch_size") or t.get("batch_size"),
        initial_learning_rate=tc.get("lr") or t.get("lr"),
        optimizer="Adam",
        loss_function="pixel MSE on scaled Gaussian density targets + relative count L1" if cfg["kind"] == "density"
        else "count regression",
        training_preprocessing=f"random {tc.get('crop') or t.get('crop') or 'n/a'} px crops, percentile normalisation",
    )


def _torchscript(net, example: np.ndarray, stride: int, where: Path) -> Optional[str]:
    """Trace the BatchNorm-folded network to ``where``; None if done, else why not."""
    import torch

    from ._nets import fold_batchnorm

    fused = fold_batchnorm(net.float().cpu().eval())
    x = torch.from_numpy(example)[None, None]
    other = torch.randn(1, 1, x.shape[-2] + 2 * stride, x.shape[-1] + stride, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(fused, x, check_trace=False)
            for probe in (x, other):
                a, b = fused(probe), traced(probe)
                if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                    return f"the traced network disagrees with the network on a {tuple(probe.shape)} input"
        traced.save(str(where))
    except Exception as exc:  # tracing failures come as many types
        return f"the network does not trace ({type(exc).__name__}: {exc})"
    return None


def _build_descr(counter, workdir: Path, x: np.ndarray, y: np.ndarray, *, name: str, authors: list,
                 licence: str, diameter: float, stride: int, torchscript: bool, notes: list):
    from bioimageio.spec.model import v0_5 as m

    cfg = counter.config
    short = _write_files(counter, workdir, x, y, name=name, diameter=diameter)
    weights = _weights_descr(counter, workdir, x, stride=stride, torchscript=torchscript, notes=notes)
    inputs, outputs = _tensor_descrs(counter, workdir, y, diameter=diameter, stride=stride)
    tol = m.ReproducibilityTolerance(relative_tolerance=1e-3, absolute_tolerance=float(1e-4 * max(1e-6, np.abs(y).max())))
    from .. import __version__

    meta = copy.deepcopy(cfg)
    meta.update(exported_from=counter.name, sha256=counter.sha256, exported_by=f"napari-cellsynth {__version__}",
                density_scale_applied=counter.kind == "density")
    return m.ModelDescr(
        name=name, description=short, authors=authors, license=licence,
        documentation=m.FileDescr(source=workdir / "README.md"), covers=[m.FileDescr(source=workdir / "cover.png")],
        tags=["cell counting", "nuclei", "density", "2d", "fluorescence", "pytorch", "napari-cellsynth"],
        inputs=inputs, outputs=outputs, weights=m.WeightsDescr(**weights),
        config=m.Config(bioimageio=m.BioimageioConfig(
            reproducibility_tolerance=[tol], task="cell counting", modality="fluorescence microscopy",
            target_structure=["nuclei"], architecture_type="EfficientNet-B0" if "b0" in cfg["backbone"] else cfg["backbone"],
            training=_training_details(cfg),
            model_parameter_count=int(sum(p.numel() for p in counter.net.parameters()))),
            **{CONFIG_KEY: _jsonable(meta)}),
    )


def _write_files(counter, workdir: Path, x: np.ndarray, y: np.ndarray, *, name: str, diameter: float) -> str:
    """Test tensors, architecture source, weights, environment, README and cover in ``workdir``; the short description."""
    import torch

    from . import _nets

    np.save(workdir / "test_input.npy", x[None, None].astype(np.float32))
    np.save(workdir / "test_output.npy", y.astype(np.float32))
    shutil.copyfile(_nets.__file__, workdir / _ARCH_FILE)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in counter.net.state_dict().items()}
    torch.save(state, workdir / _STATE_FILE)
    (workdir / "environment.yaml").write_text(
        "name: cellsynth-counter\nchannels: [conda-forge, pytorch]\n"
        f"dependencies:\n  - python>=3.10\n  - pytorch>={torch.__version__.split('+')[0]}\n  - pip\n"
        "  - pip:\n    - timm>=0.9\n", encoding="utf-8")
    short, doc = _describe(counter, name=name, diameter=diameter)
    (workdir / "README.md").write_text(doc, encoding="utf-8")
    _cover(x, y, workdir / "cover.png", counter.kind)
    return short


def _weights_descr(counter, workdir: Path, x: np.ndarray, *, stride: int, torchscript: bool, notes: list) -> dict:
    import torch
    from bioimageio.spec.model import v0_5 as m

    cfg = counter.config
    kwargs = {"backbone": cfg["backbone"], "in_chans": int(cfg["in_chans"])}
    if counter.kind == "density":
        kwargs["blocks"] = int(cfg["blocks"])
    arch = m.ArchitectureFromFileDescr(source=workdir / _ARCH_FILE,
                                       callable=m.Identifier("DensityNet" if counter.kind == "density" else "RegressionNet"),
                                       kwargs=kwargs)
    pt_version = m.Version(torch.__version__.split("+")[0])
    weights = {"pytorch_state_dict": m.PytorchStateDictWeightsDescr(
        source=workdir / _STATE_FILE, architecture=arch, pytorch_version=pt_version,
        dependencies=m.FileDescr(source=workdir / "environment.yaml"))}
    if torchscript:
        why = _torchscript(counter.net, _preprocess(x, cfg), stride, workdir / _TS_FILE)
        if why is None:
            weights["torchscript"] = m.TorchscriptWeightsDescr(
                source=workdir / _TS_FILE, pytorch_version=pt_version, parent="pytorch_state_dict",
                comment="BatchNorm folded into the convolutions, traced")
        else:
            notes.append(f"torchscript left out: {why}")
    return weights


def _tensor_descrs(counter, workdir: Path, y: np.ndarray, *, diameter: float, stride: int):
    """The input and output tensor descriptions (axes, halo, pre- and postprocessing, test tensors)."""
    from bioimageio.spec.model import v0_5 as m

    cfg = counter.config
    # One cell diameter of context on each side, a multiple of the stride so that a padded or tiled
    # input keeps the network's grid alignment (the decoder upsamples from stride-aligned features).
    halo = stride * max(1, int(np.ceil(diameter / stride)))
    # A halo is cropped from both sides of a tile: the smallest tile keeps at least one stride of output.
    size = m.ParameterizedSize(min=max(2 * stride, int(np.ceil((2 * halo + stride) / stride)) * stride), step=stride)
    inputs = [m.InputTensorDescr(
        id=m.TensorId(INPUT_ID), description="one grey plane (the nuclear channel)",
        axes=[m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("nuclei")]),
              m.SpaceInputAxis(id=m.AxisId("y"), size=size), m.SpaceInputAxis(id=m.AxisId("x"), size=size)],
        test_tensor=m.FileDescr(source=workdir / "test_input.npy"),
        data=m.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=_preprocessing(cfg))]
    if counter.kind == "density":
        out_axes = [m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("density")]),
                    m.SpaceOutputAxisWithHalo(id=m.AxisId("y"), halo=halo,
                                              size=m.SizeReference(tensor_id=m.TensorId(INPUT_ID), axis_id=m.AxisId("y"))),
                    m.SpaceOutputAxisWithHalo(id=m.AxisId("x"), halo=halo,
                                              size=m.SizeReference(tensor_id=m.TensorId(INPUT_ID), axis_id=m.AxisId("x")))]
        out_desc = "cells per pixel; the sum over a region is the number of cells there"
    else:
        out_axes = [m.BatchAxis(), m.ChannelAxis(channel_names=[m.Identifier("count")])]
        out_desc = "number of cells in the input window"
    post = ([m.ScaleLinearDescr(kwargs=m.ScaleLinearKwargs(gain=1.0 / CounterConfig.of(cfg).density_scale))]
            if counter.kind == "density" else [])
    outputs = [m.OutputTensorDescr(id=m.TensorId(OUTPUT_ID if counter.kind == "density" else "count"),
                                   description=out_desc, axes=out_axes, postprocessing=post,
                                   test_tensor=m.FileDescr(source=workdir / "test_output.npy"),
                                   data=m.IntervalOrRatioDataDescr(type="float32"))]
    return inputs, outputs


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=io.json_default))


def _cover(x: np.ndarray, y: np.ndarray, out: Path, kind: str) -> None:
    """Input and output side by side as an 8-bit PNG (the package's cover image)."""
    from skimage.io import imsave

    def u8(a):
        a = np.asarray(a, np.float64)
        lo, hi = np.percentile(a, [1, 99.8])
        return (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)

    left = u8(x)
    right = u8(y[0, 0]) if kind == "density" else np.zeros_like(left)
    gap = np.full((left.shape[0], 4), 255, np.uint8)
    imsave(str(out), np.concatenate([left, gap, right], axis=1), check_contrast=False)


def _summary_dict(summary) -> dict:
    details = []
    for d in summary.details:
        details.append({"name": d.name, "status": d.status,
                        "errors": [e.msg for e in getattr(d, "errors", [])]})
    return {"status": summary.status, "details": details}


def export_counter(
    model: Any,
    out: str | os.PathLike,
    *,
    name: Optional[str] = None,
    authors: Optional[list] = None,
    licence: str = "BSD-3-Clause",
    test_image: Optional[np.ndarray] = None,
    torchscript: bool = True,
    check: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Write a counter as a bioimage.io model package.

    Parameters
    ----------
    model : str, path-like or Counter
        Anything :func:`~cellsynth.count.models.load_counter` accepts; density
        and regression counters (the classic counter has no weights to export).
    out : path-like
        The package file, ending in ``.zip``.
    name : str, optional
        Model name in the description (default: from the model's config or path).
    authors : list of str, optional
        Author names (default: the login name).
    licence : str
        SPDX licence id of the weights.
    test_image : ndarray of shape (M, N), optional
        Raw test input (default: a 128x128 crop of the shipped nuclei image);
        cropped to a multiple of the network's stride.
    torchscript : bool
        Also ship TorchScript weights where the network traces.
    check : bool
        Run bioimageio.core's own test (inference on the test input, compared to
        the counter's output) before writing; a failure raises and writes nothing.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    ExportResult

    Raises
    ------
    ValueError
        A classic counter, a name not ending in ``.zip``, a test image that is
        too small or too sparse, an invalid package or a failed test.
    FileExistsError
        ``out`` exists and ``overwrite`` is False.
    ImportError
        bioimageio.spec / bioimageio.core are not installed.
    """
    from .models import load_counter

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ValueError(f"a bioimage.io package is a .zip file; got --out {str(out)!r}")
    io.prepare_output(out, overwrite=overwrite)
    counter = load_counter(model, device="cpu")
    if counter.kind == "classic" or counter.net is None:
        raise ValueError("the classic counter has no network weights to export; export a trained density or "
                         "regression counter")
    _require_bioimageio()
    if check:
        try:
            import bioimageio.core  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"testing the package needs bioimageio.core; {_EXTRA_HINT} (or pass check=False)") from exc
    import getpass

    from bioimageio.spec import ValidationContext, save_bioimageio_package
    from bioimageio.spec.model import v0_5 as m

    stride = int(getattr(counter.net, "stride", 32))
    x = _prepare_test_input(test_image, counter.config, stride)
    y = _reference_output(counter, x)
    cfg_name = counter.config.get("name") or (Path(str(counter.name)).name if counter.name else "counter")
    name = name or f"CellSynth {counter.kind} counter {cfg_name}"
    if authors is None:
        try:
            authors = [getpass.getuser()]
        except Exception:  # no login name in some containers
            authors = ["unknown"]
    notes: list = []
    with tempfile.TemporaryDirectory(prefix="cellsynth-bioimageio-") as tmp:
        work = Path(tmp)
        with ValidationContext(root=work, perform_io_checks=True), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = _build_descr(counter, work, x, y, name=name, authors=[m.Author(name=a) for a in authors],
                                 licence=licence, diameter=counter.diameter, stride=stride,
                                 torchscript=torchscript, notes=notes)
            staged = work / "package.zip"
            save_bioimageio_package(descr, output_path=staged)
        summary = None
        if check:
            from bioimageio.core import test_model

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the library's deprecation and parsing chatter
                result = test_model(staged, devices=["cpu"])
            summary = _summary_dict(result)
            if result.status != "passed":
                failed = [f"{d['name']}: {'; '.join(d['errors'])}" for d in summary["details"] if d["status"] == "failed"]
                raise ValueError("bioimageio.core's test of the package failed, nothing written: " + " | ".join(failed))
        with io.atomic_path(out, overwrite=overwrite) as dst:
            shutil.copyfile(staged, dst)
    return ExportResult(path=out, weight_formats=list(descr.weights.available_formats), test=summary, notes=notes)
