"""Writes that never leave a half-written file: a temporary file beside the target, then a rename.

:func:`atomic_path` is the one way the project writes a file; :func:`remove_unfinished`
and :func:`remove_stale_parts` remove what an interrupt or a killed process left;
:func:`prepare_output` checks an output before the work that makes it. Re-exported
by :mod:`cellsynth.io`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Optional

__all__ = ["atomic_path", "remove_stale_parts", "remove_unfinished", "prepare_output"]


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``path`` when the block succeeds.

    Parameters
    ----------
    path : path-like
        Final destination.
    overwrite : bool
        Replace an existing file. Default False.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    _check_writable_place(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_part(path)
    try:
        yield tmp
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} appeared while writing; not replaced")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        with _UNFINISHED_LOCK:
            _UNFINISHED.discard(tmp)


#: Temporary files of the writes under way in this process (see :func:`remove_unfinished`).
_UNFINISHED: set[Path] = set()
_UNFINISHED_LOCK = threading.Lock()


def _new_part(path: Path) -> Path:
    """Create an empty temporary file beside ``path``, recorded before it exists.

    The name is recorded first, so an interrupt that arrives between creating
    the file and entering the ``try`` of :func:`atomic_path` cannot leave it
    behind unrecorded: :func:`remove_unfinished` removes it.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        with _UNFINISHED_LOCK:
            _UNFINISHED.add(tmp)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask
            return tmp
        except FileExistsError:
            with _UNFINISHED_LOCK:
                _UNFINISHED.discard(tmp)
        except BaseException:  # an error or an interrupt, perhaps after the file was made
            tmp.unlink(missing_ok=True)
            with _UNFINISHED_LOCK:
                _UNFINISHED.discard(tmp)
            raise
    raise FileExistsError(f"no free temporary name beside {path}")


def remove_unfinished() -> list[Path]:
    """Remove the temporary files of this process's unfinished writes.

    Called after an interrupt (Ctrl-C, SIGTERM) that may have arrived while a
    write was being set up or torn down, outside the reach of its ``finally``.

    Returns
    -------
    list of Path
        The removed files.
    """
    with _UNFINISHED_LOCK:
        left = sorted(_UNFINISHED)
        _UNFINISHED.clear()
    removed = []
    for tmp in left:
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


#: Temporary names made by :func:`atomic_path`: ``.NAME.XXXXXXXX.part`` (8 random hexadecimal digits).
_PART = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.part$")


def remove_stale_parts(folder: os.PathLike | str, *, names: Optional[Collection[str]] = None) -> list[Path]:
    """Remove temporary files that killed atomic writes left in ``folder``.

    Parameters
    ----------
    folder : path-like
        The folder to clean (not its sub-folders); a missing folder is fine.
    names : collection of str, optional
        Only the temporary files of these final names; by default those of any name.

    Returns
    -------
    list of Path
        The removed files.
    """
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _PART.match(p.name)
        if m and (names is None or m.group("name") in names) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prepare_output(path: os.PathLike | str, *, overwrite: bool = False) -> Path:
    """Check an output file before the work that makes it, and remove its stale temporary files.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    _check_writable_place(path)
    remove_stale_parts(path.parent, names=(path.name,))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    return path


def _check_writable_place(path: Path) -> None:
    """Refuse an output file path that is a folder, or lies under a regular file (before any work)."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected the path of a file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
            break
