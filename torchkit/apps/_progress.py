"""Progress bars of the command-line apps on stderr: tqdm's live bar on a terminal, one plain line every
``LINE_INTERVAL_S`` elsewhere (a log file, CI), with no carriage returns or padding in the file."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["LINE_INTERVAL_S", "bar"]

LINE_INTERVAL_S = 10.0  # off a terminal: one progress line per this many seconds (and the last one)


class _Lines:
    """A stream for tqdm off a terminal: each refresh becomes one line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, desc: str, unit: str, *, lines: bool | None = None, stream: TextIO | None = None):
    """A tqdm bar of ``total`` ``unit``s (0: a total set later): ``lines`` (default: when ``stream``, stderr by
    default, is not a terminal) prints ``desc: n/total units (p%), elapsed, left`` as lines."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if lines is None:
        lines = not (hasattr(stream, "isatty") and stream.isatty())
    if not lines:
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    fmt = "{desc}: {n_fmt}/{total_fmt} " + unit + "s ({percentage:.0f}%), {elapsed} elapsed, {remaining} left{postfix}"
    # miniters=1: tqdm checks the clock at every update, so its monitor thread never adds a line of its own
    return tqdm(total=total, desc=desc, file=_Lines(stream), mininterval=LINE_INTERVAL_S, miniters=1, bar_format=fmt)
