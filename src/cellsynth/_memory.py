"""Refusing work that the free memory cannot hold, and one-line messages from decoders' errors.

The bottom of the package: :mod:`cellsynth.io` re-exports these.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["NotEnoughMemory", "require_memory", "first_line", "human_size"]


class NotEnoughMemory(ValueError):
    """The estimated peak memory of some work exceeds the memory free now."""


def require_memory(nbytes: float, *, what: str, hint: str) -> None:
    """Refuse work whose estimated peak memory exceeds the memory free now.

    Parameters
    ----------
    nbytes : float
        Estimated peak, in bytes.
    what : str
        The work, for the message (e.g. ``"reading x.tif ((40000, 40000) uint8)"``).
    hint : str
        What would make it fit.

    Raises
    ------
    NotEnoughMemory
        A ValueError naming both sizes and the hint.
    """
    import psutil

    free = psutil.virtual_memory().available
    if nbytes > free:
        raise NotEnoughMemory(f"{what} needs about {human_size(nbytes)} of memory but only {human_size(free)} are free; {hint}")


def first_line(exc: BaseException, limit: Optional[int] = None) -> str:
    """The first line of an exception's message (decoders may add several lines of advice), cut at ``limit``.

    Examples
    --------
    >>> first_line(ValueError("bad header\\nadvice"))
    'bad header'
    >>> first_line(OSError("Got: " + "x" * 10), limit=4)
    'xxxx…'
    """
    text = str(exc).strip()
    text = (text.splitlines()[0].strip() if text else type(exc).__name__).removeprefix("Got: ")
    return text if limit is None or len(text) <= limit else text[:limit] + "…"

def human_size(nbytes: float) -> str:
    """A byte count for people.

    Examples
    --------
    >>> human_size(4270e6), human_size(88e6), human_size(5000)
    ('4.3 GB', '88 MB', '5 kB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if unit == "GB" else f"{value:.0f} {unit}"
    return f"{int(nbytes)} B"
