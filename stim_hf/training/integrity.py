"""Content hashes of the folders stim_hf writes: recorded once a folder is written, checked before it is used.

Every folder stim_hf writes gets a manifest, written last: a checkpoint ``stim_hf_checkpoint.json``
(with its step), any other model folder (a run's final model, an export, a fine-tuned export)
``stim_hf_manifest.json``. It records each file's size and a hash of its bytes. Every reader
(resume, export, search, fine-tune, loafing, a ``model_name_or_path``) checks them before it uses
the files, through :func:`content_problems`: a file whose bytes changed while its size did not
(bit rot, an interrupted copy onto a preallocated file, a faulty network filesystem) is named,
never used.

Why xxh3-128 and not sha256 (``python bench/performance/checkpoint_hashing.py``, docs/reliability.md): on a
ResNet-50 checkpoint (205 MB: weights and momentum) the manifest took 5-6 % of the time of writing
the checkpoint with xxh3-128 (the ``xxhash`` package, which ``datasets`` requires too; 9-13 GB/s)
and 22-36 % with sha256 (0.9-1.4 GB/s, on a CPU with the SHA extensions; CPUs without them hash
sha256 several times slower, not measured here). The hashes guard against accidental damage, not against
someone who could rewrite the manifest as well, so a non-cryptographic 128-bit hash loses nothing;
blake2b and md5 were slower than sha256. A manifest names its hash (``"hash"``), and sha256
manifests are checked too.

A folder written before this (a manifest of sizes only, or a stim_hf folder without a manifest) is
still read, with a one-time note that its bytes cannot be checked. Nothing here prints a file's
contents: only names, sizes and the fact that the bytes differ.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

logger = logging.getLogger(__name__)

HASH_NAME = "xxh3_128"
"""The hash a manifest records (see the module's docstring for why)."""
HASHES: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
"""The hashes a manifest may name, by name: ``new()`` objects with ``update`` and ``hexdigest``."""
CHECKPOINT_MANIFEST_NAME = "stim_hf_checkpoint.json"
"""A checkpoint's manifest: its step, and each file's size and hash."""
FOLDER_MANIFEST_NAME = "stim_hf_manifest.json"
"""Any other model folder's manifest (a run's final model, an export): each file's size and hash."""
MANIFEST_NAMES = (CHECKPOINT_MANIFEST_NAME, FOLDER_MANIFEST_NAME)
MANIFEST_FORMAT = 2
"""1: sizes only (before content hashes); 2: also ``hash`` (its name) and ``hashes`` (a map of its own, so that
format-1 readers still read the sizes)."""
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
"""Files of a checkpoint that only a resume reads: a tool that loads the model leaves them unread, and unchecked."""
UNCHECKED_ON_READ = ("README.md",)
"""The model card: recorded, but edited on the Hub and by hand, and read by no tool, so never a reason to refuse."""
STIM_HF_RECORDS = ("training_args.json", "export_info.json")
"""Files that mark a folder without a manifest as one stim_hf wrote before content hashes (for the one-time note)."""
_BUFFER_BYTES = 1 << 20
_DIGEST_CACHE_SIZE = 4096

# (device, inode, size, mtime, ctime, hash) of a file -> its digest: a file read twice by one process (checked by
# one function, then loaded by another) is hashed once. Any write, rename or copy changes the key.
_digests: dict[tuple[int, int, int, int, int, str], str] = {}
_noted: set[str] = set()


# --------------------------------------------------------------------------------------------------
# Hashing and writing
# --------------------------------------------------------------------------------------------------


def file_digest(path: str | os.PathLike, hash_name: str | None = None) -> str:
    """The hash ``hash_name`` (default :data:`HASH_NAME`) of the file ``path`` (hex), read in 1 MiB pieces;
    remembered for an unchanged file."""
    hash_name = hash_name or HASH_NAME
    stat = os.stat(path)
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, hash_name)
    known = _digests.get(key)
    if known is not None:
        return known
    digest = HASHES[hash_name]()
    buffer = bytearray(_BUFFER_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    if len(_digests) >= _DIGEST_CACHE_SIZE:
        _digests.clear()
    _digests[key] = digest.hexdigest()
    return _digests[key]


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every file under ``folder`` but its manifests, as sorted POSIX paths relative to it."""
    root = Path(folder)
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.name not in MANIFEST_NAMES and not path.name.startswith(".manifest-")
    )


def write_folder_manifest(
    folder: str | os.PathLike, name: str = FOLDER_MANIFEST_NAME, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Record every file of ``folder`` (its size and hash) in the manifest ``name``; returns the manifest.

    Call it once the folder's files are written and before it is published: the files were just
    written, so they are read back from memory, once. The manifest is written to a temporary
    name, fsynced and renamed, so a reader sees the old one or the complete new one.
    """
    files, hashes = {}, {}
    for relative in folder_files(folder):
        path = Path(folder, relative)
        files[relative] = path.stat().st_size
        hashes[relative] = file_digest(path, HASH_NAME)
    manifest = {"format": MANIFEST_FORMAT, **(extra or {}), "files": files, "hash": HASH_NAME, "hashes": hashes}
    target = Path(folder, name)
    temporary = Path(folder, f".manifest-{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return manifest


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def content_problems(
    folder: str | os.PathLike,
    manifest: Mapping[str, Any],
    name: str = FOLDER_MANIFEST_NAME,
    skip: Iterable[str] = (),
    hashes: bool = True,
) -> list[str]:
    """What differs between ``folder`` and its ``manifest`` (file ``name``): a missing file, another size, other bytes.

    ``skip``: patterns of files left unchecked (:data:`TRAINING_STATE_FILES` for a tool that only
    loads the model). ``hashes=False`` checks sizes only (choosing which checkpoint to rotate away).
    A manifest without hashes (written before them) is checked for sizes, with a one-time note.
    """
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"its {name} does not list the folder's files with their sizes"]
    recorded, hash_name = manifest.get("hashes"), manifest.get("hash")
    if recorded is not None and not (
        isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values()) and isinstance(hash_name, str)
    ):
        return [f"its {name} has a malformed map of hashes"]
    if recorded is not None and hash_name not in HASHES:
        if hashes:
            note_without_hashes(folder, f"its {name} holds {hash_name} hashes, which this version cannot check")
        recorded = None
    elif recorded is None and hashes:
        note_without_hashes(folder, f"its {name} lists sizes only")
    skipped = (*skip, *UNCHECKED_ON_READ)
    problems, damaged = [], []
    for file, size in files.items():
        if any(fnmatch.fnmatch(file, pattern) for pattern in skipped):
            continue
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            problems.append(f"{file} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{file} has {os.path.getsize(path)} bytes instead of {size}")
        elif hashes and recorded is not None and file in recorded and file_digest(path, hash_name) != recorded[file]:
            damaged.append(file)
    if damaged:
        which = f"{damaged[0]} is" if len(damaged) == 1 else f"{', '.join(damaged)} are"
        problems.append(
            f"{which} damaged (the bytes differ from those written, at the same size: the {hash_name} hash is not "
            f"the one in {name})"
        )
    return problems


def read_manifest(folder: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """The manifest of ``folder`` (its name and contents), or None when it has none; ValueError when unreadable."""
    for name in MANIFEST_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    manifest = json.load(handle)
            except (OSError, ValueError) as error:
                raise ValueError(f"its {name} is unreadable ({type(error).__name__}: {error})") from None
            if not isinstance(manifest, dict):
                raise ValueError(f"its {name} is not a JSON object")
            return name, manifest
    return None


def folder_problems(folder: str | os.PathLike, skip: Iterable[str] = TRAINING_STATE_FILES) -> list[str]:
    """What in model folder ``folder`` differs from its manifest (empty: as written, or no manifest to check).

    Used by every tool that loads a saved model. A folder without a manifest (``save_pretrained``,
    a Hub download) has nothing to check here; one that stim_hf wrote before content hashes gets
    a one-time note. ``skip``: patterns of files the caller does not read.
    """
    try:
        found = read_manifest(folder)
    except ValueError as error:
        return [str(error)]
    if found is None:
        if any(os.path.isfile(os.path.join(folder, name)) for name in STIM_HF_RECORDS):
            note_without_hashes(folder, f"it has no {FOLDER_MANIFEST_NAME}")
        return []
    name, manifest = found
    return content_problems(folder, manifest, name, skip)


def damage_remedy(folder: str | os.PathLike) -> str:
    """What to do about a folder that differs from its manifest (the end of an error message)."""
    found = next((name for name in MANIFEST_NAMES if os.path.isfile(os.path.join(folder, name))), MANIFEST_NAMES[1])
    return (
        "copy it again from where it was written, or write it again; if its files were changed on purpose, delete "
        f"its {found} to use them unchecked"
    )


def note_without_hashes(folder: str | os.PathLike, why: str) -> None:
    """Say once per folder (per process) that ``folder`` was written before content hashes, so damage goes unseen."""
    key = os.path.realpath(folder)
    if key in _noted:
        return
    _noted.add(key)
    logger.warning(
        "note: '%s' was written before stim_hf recorded content hashes (%s): its files are checked for presence and "
        "size, not for damaged bytes",
        folder,
        why,
    )
