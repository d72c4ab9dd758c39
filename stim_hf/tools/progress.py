"""Progress of a command's phases: a tqdm bar on a terminal, a plain line every few seconds in a log.

Each phase gets its own bar, whose total is known before it starts (``stim-hf search``: one per
successive-halving round or evolution generation). Where the stream is not a terminal (a log
file, a pipe, a batch job), tqdm's carriage returns would make one endless line; there
:class:`LineProgress` writes a whole line at the start, at most every ``every_s`` seconds, and at
the end. In a Jupyter notebook tqdm's widget is kept.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

LINE_EVERY_S = 5.0
"""Seconds between two progress lines where the stream is not a terminal."""


class Progress(Protocol):
    """What a phase's progress offers: count done work, then close (also as a context manager)."""

    def update(self, n: int = 1) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> None: ...


def progress(
    total: int,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    every_s: float = LINE_EVERY_S,
    file: TextIO | None = None,
) -> Progress:
    """A progress display for one phase of ``total`` units of work.

    On a terminal (or in a notebook) a tqdm bar; otherwise a :class:`LineProgress` that writes a
    line every ``every_s`` seconds. ``enabled=False`` shows nothing. ``file`` defaults to stderr.
    """
    stream = sys.stderr if file is None else file
    if enabled and not shows_bars(stream):
        return LineProgress(total, desc, unit, every_s, stream)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=file)


class LineProgress:
    """Progress as whole lines: ``desc: 40/108 subnets (37%), 12 s, 3.3 subnets/s, about 21 s left``.

    A line when the phase starts, then as work is done at most one every ``every_s`` seconds and one
    per 1 % of ``total`` (a long run writes about a hundred, a short one a line every few seconds),
    and a last one when it closes (with the count reached, if the phase ended early). ``initial``:
    units done before this display started (a resumed run); the rate counts only those done since.
    """

    def __init__(self, total: int, desc: str, unit: str, every_s: float, file: TextIO, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.every_s, self.file = total, desc, unit, every_s, file
        self.n = self.initial = self._last_n = initial
        self.started = self._last = time.monotonic()
        self.closed = False
        self._write(self._line(0.0))

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done; write a line if ``every_s`` seconds and 1 % of the total passed since the
        last one."""
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s and self.n - self._last_n >= self.total / 100 and self.n < self.total:
            self._last, self._last_n = now, self.n
            self._write(self._line(now - self.started))

    def write(self, text: str) -> None:
        """Write a line of other text between the progress lines (as tqdm's ``write``)."""
        self._write(text)

    def close(self) -> None:
        """Write the last line (once)."""
        if self.closed:
            return
        self.closed = True
        self._write(self._line(time.monotonic() - self.started, done=True))

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, elapsed: float, done: bool = False) -> str:
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}s{share}, {elapsed:.0f} s"
        if done:
            return text + (", done" if self.n >= self.total else ", stopped")
        if self.n > self.initial and elapsed > 0:
            rate = (self.n - self.initial) / elapsed
            text += f", {rate:.3g} {self.unit}s/s, about {(self.total - self.n) / rate:.0f} s left"
        return text

    def _write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()


def shows_bars(stream: TextIO) -> bool:
    """Whether a tqdm bar displays well on ``stream``: a terminal, or a notebook's widget."""
    return _is_terminal(stream) or _in_notebook()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether tqdm.auto draws a notebook widget here (a Jupyter kernel), which needs no terminal."""
    import tqdm.auto  # noqa: F401  (imports tqdm.autonotebook with its notebook-mode warning silenced)
    from tqdm import autonotebook, std

    return autonotebook.tqdm is not std.tqdm
