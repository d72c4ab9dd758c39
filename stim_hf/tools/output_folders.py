"""The folders the tools write: nothing a user saved is replaced unasked, and a training checkpoint never."""

from __future__ import annotations

import os
from pathlib import Path

from stim_hf.errors import ConfigError
from stim_hf.training.checkpointing import MANIFEST_NAME, TRAINER_STATE_NAME

CHECKPOINT_MARKERS = ((MANIFEST_NAME,), (TRAINER_STATE_NAME, "optimizer.pt"))
"""Files that make a folder a training checkpoint (any one group of them)."""


def check_new_folder(path: str | os.PathLike, flag: str, overwrite: bool = False, replaced: str = "its files") -> None:
    """Refuse a folder whose contents would be lost: a :class:`ConfigError` naming ``flag`` and the fix.

    A missing or empty folder is fine and a non-empty one needs ``overwrite`` (``replaced`` says what
    would be replaced). A file is refused, and so is a training checkpoint, even with ``overwrite``: its
    model would no longer match its optimizer state, so it could not be resumed.
    """
    folder = Path(path)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{flag} '{path}' is a file; give a new folder as {flag}")
    entries = set(os.listdir(folder))
    marker = next((names for names in CHECKPOINT_MARKERS if entries.issuperset(names)), None)
    if marker is not None:
        raise ConfigError(
            f"{flag} '{path}' is a training checkpoint (it has {' and '.join(marker)}), which is never written into, "
            "not even with --overwrite (its model would no longer match its optimizer state, so it could not be "
            f"resumed); give a new folder as {flag}"
        )
    if entries and not overwrite:
        raise ConfigError(
            f"{flag} '{path}' already exists and is not empty; give a new folder as {flag}, or pass --overwrite "
            f"(overwrite=True in Python) to replace {replaced}"
        )
