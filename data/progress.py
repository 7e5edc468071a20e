"""Progress bars that read well both in a terminal and in a log file.

On a terminal, tqdm redraws one line with carriage returns. In a log (a SLURM ``.out`` file,
``| tee``, CI) each redraw would be kept, so there the bar prints a plain line of stats
(no bar glyphs) at most every :data:`LOG_INTERVAL_S` seconds, plus the final state. tqdm's
own ``TQDM_MININTERVAL`` environment variable sets that interval (e.g. ``0``: every update).
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from tqdm.auto import tqdm as tqdm_auto
from tqdm.std import tqdm

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        # tqdm writes "\r" + status + spaces that erase a longer previous status.
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def progress(
    *,
    total: int | None,
    unit: str,
    initial: int = 0,
    desc: str | None = None,
    disable: bool = False,
    stream: IO[str] | None = None,
) -> tqdm:
    """A tqdm bar on ``stream`` (stderr): redrawn on a terminal, one line per interval in a log.

    Args:
        total: Expected count, or None when unknown (then no percentage or ETA).
        unit: Name of one item (``step``, ``img``).
        initial: Count already done (a resumed run).
        desc: Text before the stats.
        disable: No output at all (e.g. on every rank but the main one).
        stream: Where to write; ``sys.stderr`` when None.

    Returns:
        The bar; update it with ``update(n)``, set stats with ``set_postfix(..., refresh=False)``
        (a refresh would print a line in a log whatever the interval) and ``close()`` it.
    """
    stream = stream or sys.stderr
    common: dict[str, Any] = {
        "total": total,
        "initial": initial,
        "unit": unit,
        "desc": desc,
        "disable": disable,
    }
    if _is_tty(stream):
        if _columns(stream) > 0:
            return tqdm_auto(file=stream, dynamic_ncols=True, **common)
        # A terminal without a size (docker -t, script): tqdm would trim the bar to nothing.
        return tqdm_auto(file=stream, ncols=80, nrows=24, **common)
    try:
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_INTERVAL_S))
    except ValueError:
        interval = LOG_INTERVAL_S
    return tqdm(
        file=_Lines(stream),
        ncols=0,  # tqdm's stats-only format: "desc: 40% 4/10 [00:02<00:03, 1.9step/s, ...]"
        mininterval=interval,
        # miniters=1: print on the first update past the interval. With the default dynamic
        # miniters tqdm's monitor thread would also force redraws every maxinterval seconds.
        miniters=1,
        maxinterval=max(interval, 10.0),
        **common,
    )
