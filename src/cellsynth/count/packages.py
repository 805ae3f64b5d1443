"""Reading the bioimage.io model packages this product exports (:mod:`cellsynth.count.bioimageio`).

A package is a ``.zip`` with ``rdf.yaml``; its description carries the counter's
config under ``config.cellsynth``. The description is read as plain YAML data (no
tags that build objects) and the weights with ``torch.load(weights_only=True)``
after their sha256 is checked: nothing in a package is executed.
"""

from __future__ import annotations

import io as _io
import os
import zipfile
from pathlib import Path
from typing import Optional

from .. import io
from .counter import COUNTER_FORMAT, KINDS, Counter, _adapt_keys, _build_loaded

__all__ = ["CONFIG_KEY", "RDF_NAMES", "is_counter_package", "load_package_counter"]

CONFIG_KEY = "cellsynth"
RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")


def _rdf_name(zf: zipfile.ZipFile) -> Optional[str]:
    names = set(zf.namelist())
    return next((n for n in RDF_NAMES if n in names), None)


def is_counter_package(path: str | os.PathLike) -> bool:
    """True for a ``.zip`` whose description carries a counter config of this product."""
    try:
        _read_rdf(Path(path))
    except (ValueError, OSError):
        return False
    return True


def _read_rdf(path: Path) -> tuple[dict, dict]:
    import yaml

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a zip file; expected a bioimage.io model package") from exc
    with zf:
        rdf_name = _rdf_name(zf)
        if rdf_name is None:
            raise ValueError(f"{path} holds no rdf.yaml; expected a bioimage.io model package")
        try:
            rdf = yaml.safe_load(zf.read(rdf_name))
        except yaml.constructor.ConstructorError as exc:  # tags such as !!python/object: never constructed
            raise ValueError(f"{path}: {rdf_name} holds a tag that is not plain YAML data ({exc.problem}); "
                             "it was not loaded") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"{path}: {rdf_name} is not valid YAML{at}; expected a bioimage.io model "
                             "description") from None
    cfg = ((rdf or {}).get("config") or {}).get(CONFIG_KEY) if isinstance(rdf, dict) else None
    if not isinstance(cfg, dict) or cfg.get("format") != COUNTER_FORMAT or cfg.get("kind") not in KINDS[:2]:
        raise ValueError(f"{path} is a bioimage.io package but not a counter exported by napari-cellsynth "
                         f"(no config.{CONFIG_KEY}); run packages of other tools with bioimageio.core")
    return rdf, cfg


def load_package_counter(path: str | os.PathLike):
    """A :class:`~cellsynth.count.counter.Counter` (on CPU) from a package made by :func:`~cellsynth.count.bioimageio.export_counter`.

    The ``pytorch_state_dict`` weights are read with ``torch.load(weights_only=True)``
    after their sha256 is checked against the description; nothing in the
    package is executed.

    Raises
    ------
    ValueError
        Not a zip, no description, not made by this product, a hash mismatch or
        weights that do not fit the config.
    """
    import hashlib

    import torch

    path = Path(path)
    rdf, cfg = _read_rdf(path)
    wd = ((rdf.get("weights") or {}).get("pytorch_state_dict") or {})
    src, sha = wd.get("source"), wd.get("sha256")
    with zipfile.ZipFile(path) as zf:
        if not isinstance(src, str) or src not in zf.namelist():
            raise ValueError(f"{path} has no pytorch_state_dict weights file inside the package")
        info = zf.getinfo(src)
        io.require_memory(3.0 * info.file_size, what=f"loading the weights in {path}",
                          hint="is this really a counter? counters are a few MB")
        raw = zf.read(src)
    digest = hashlib.sha256(raw).hexdigest()
    if sha and digest != sha:
        raise ValueError(f"the weights in {path} do not match their sha256 in the description; the package is damaged")
    try:
        state = torch.load(_io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal and corrupt files alike
        raise ValueError(f"the weights in {path} could not be read as plain tensors: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"the weights in {path} are not a state dict of tensors")
    cfg = {k: v for k, v in cfg.items() if k not in ("exported_from", "exported_by", "sha256", "density_scale_applied")}
    net = _build_loaded(cfg, _adapt_keys(state, cfg["kind"]), path)
    return Counter(kind=cfg["kind"], name=str(path), config=cfg, net=net, sha256=digest, path=path)
