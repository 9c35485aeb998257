"""Progress bars that also report where no terminal shows them.

tqdm's own choice for a stream that is not a terminal (disable=None) is silence, so `make demo`
piped to a log, run from a notebook's `!` cell or in CI said nothing for its 26 minutes. There a
bar becomes a plain line now and then, each on its own line rather than redrawn with carriage
returns that a log file keeps.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 60.0
"""Seconds between progress lines written to a stream that is not a terminal."""


def progress(**kwargs: Any) -> tqdm:
    """tqdm(**kwargs) drawing on stderr: a live bar on a terminal, else a line per LOG_INTERVAL."""
    if sys.stderr.isatty():
        return tqdm(**kwargs)
    # miniters=1: tqdm's adaptive miniters would let its monitor thread redraw every 10 s
    return tqdm(**kwargs, file=Lines(sys.stderr), mininterval=LOG_INTERVAL, miniters=1, ascii=True)


class Lines:
    """A file for tqdm that writes each redraw as a line, once: tqdm redraws the last state
    when it closes, which would repeat the final line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        state = line.split("[")[0]  # without the elapsed time and rate, which a redraw changes
        if line and state != self.last:
            self.stream.write(line + "\n")
            self.last = state

    def flush(self) -> None:
        self.stream.flush()
