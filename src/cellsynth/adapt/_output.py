"""Writing a counter folder atomically: everything into a hidden sibling, then one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .. import io

__all__ = ["check_out", "write_counter_folder", "REPORT_FILE"]

REPORT_FILE = "adapt_report.json"
#: What a counter folder holds; ``overwrite`` replaces a folder holding these and nothing else.
COUNTER_FILES = frozenset({"model.safetensors", "config.json", REPORT_FILE, "provenance.json"})


def check_out(out, overwrite: bool) -> Optional[Path]:
    """Refuse an ``out`` that is a file, or a non-empty folder unless ``overwrite``; None passes."""
    if out is None:
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path or None, got {type(out).__name__}")
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"out {str(p)!r} is a file; expected a folder for the counter")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out folder {str(p)!r} is not empty; choose another folder or pass overwrite=True "
                                  "(--overwrite)")
        foreign = sorted(f.name for f in p.iterdir() if f.name not in COUNTER_FILES)
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise FileExistsError(f"out folder {str(p)!r} holds files this product did not write there "
                                  f"({', '.join(foreign[:3])}{more}); overwrite replaces a counter folder only, "
                                  "so choose another folder")
    return p


def write_counter_folder(out: Path, net, config: dict, report: dict, *, overwrite: bool) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the report into ``out`` in one step.

    The files are written into a hidden folder beside ``out``, which then
    replaces ``out`` by a rename, so ``out`` never holds a partial counter.
    """
    from ..count.models import save_counter

    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        save_counter(net, config, tmp)
        io.write_json(tmp / REPORT_FILE, report)
        from .._provenance import record, write_into

        write_into(tmp, record(str(report.get("operation", "adapt")), inputs=report.get("sources") or [],
                               model=report.get("base"), parameters=report.get("params") or report.get("settings"),
                               result={"accepted": report.get("accepted"), "decision": report.get("decision")}))
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
