"""One progress and cancel contract for every long operation.

Every long-running function in cellsynth takes ``progress: ProgressCallback | None``
and calls it once per coarse step (layout, tile, batch, epoch, denoising step).
The callback may raise :class:`Cancelled`; core code lets it propagate, so the
caller (a napari worker, the CLI) decides what a cancel means.

Examples
--------
>>> seen = []
>>> report(seen.append, "layouts", 1, 3)
>>> seen[0]
Progress(stage='layouts', step=1, total=3, message='')
>>> report(None, "layouts", 2, 3)  # no callback: nothing happens
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

__all__ = ["Progress", "ProgressCallback", "Cancelled", "report", "tqdm_callback"]


@dataclass(frozen=True)
class Progress:
    """One progress event.

    Parameters
    ----------
    stage : str
        Short name of what is running (``"layouts"``, ``"tiles"``, ``"epoch"``).
    step : int
        Steps done so far in this stage (1-based once a step has finished).
    total : int or None
        Number of steps in this stage, or None when unknown.
    message : str
        Optional human-readable detail.
    """

    stage: str
    step: int
    total: Optional[int]
    message: str = ""

    @property
    def fraction(self) -> Optional[float]:
        """Fraction done in [0, 1], or None when the total is unknown.

        Examples
        --------
        >>> Progress("x", 1, 4).fraction
        0.25
        """
        if not self.total:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)


ProgressCallback = Callable[[Progress], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop a long operation."""


def report(
    progress: Optional[ProgressCallback],
    stage: str,
    step: int,
    total: Optional[int],
    message: str = "",
) -> None:
    """Send one :class:`Progress` event to ``progress`` if it is not None."""
    if progress is not None:
        progress(Progress(stage, step, total, message))


def tqdm_callback(*, disable: bool = False):
    """Return ``(callback, close)`` that shows progress events as tqdm bars.

    A new bar starts whenever the stage changes. Used by the command line.
    """
    from tqdm.auto import tqdm

    state: dict = {"bar": None, "stage": None}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def callback(p: Progress) -> None:
        if p.stage != state["stage"]:
            close()
            state["stage"] = p.stage
            state["bar"] = tqdm(total=p.total, desc=p.stage, disable=disable, leave=True)
        bar = state["bar"]
        bar.n = p.step
        if p.message:
            bar.set_postfix_str(p.message, refresh=False)
        bar.refresh()

    return callback, close
