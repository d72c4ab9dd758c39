"""``datasets``' progress as whole lines where stderr is a log, not a terminal.

Loading a data set and decoding its images (``load_dataset``'s "Generating train split", a ``map``)
draw tqdm bars; in a log file (``nohup``, a batch job, a pipe) their carriage returns pile every
update onto one line. :func:`datasets_work_in_lines` runs such work with ``datasets``' bars off
there and writes a line when it starts and one when it ends, so a long decoding still shows that
the job is alive and how long it took. On a terminal or in a notebook the bars stay.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import datasets

from stim_hf.tools.progress import shows_bars


@contextlib.contextmanager
def datasets_work_in_lines(desc: str, file: TextIO | None = None, show: bool = True) -> Iterator[bool]:
    """Run the block's ``datasets`` work with its bars as two lines (``desc ...``, ``desc: done, 12 s``) in a log.

    Yields whether it wrote them: not on a terminal or in a notebook (the bars show there), not where
    the bars are already off (by the user, or by an enclosing block: no lines either), and not where
    ``HF_DATASETS_DISABLE_PROGRESS_BARS`` is set (the user's choice stands). ``show=False`` (a
    command's ``--progress false``) turns the bars off for the block and writes nothing, terminal or
    not. ``file`` defaults to stderr.
    """
    stream = sys.stderr if file is None else file
    if (
        (show and shows_bars(stream))
        or datasets.are_progress_bars_disabled()
        or os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is not None
    ):
        yield False
        return
    datasets.disable_progress_bars()
    started = time.monotonic()
    if show:
        _write(stream, f"{desc} ...")
    ended = "stopped"
    try:
        yield show
        ended = "done"
    finally:
        datasets.enable_progress_bars()
        if show:
            _write(stream, f"{desc}: {ended}, {time.monotonic() - started:.0f} s")


def _write(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()
