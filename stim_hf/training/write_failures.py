"""Failed writes in the user's terms: one line naming the cause as the OS reports it, the folder, and what is safe.

A checkpoint, a final model, an export or a fine-tuned folder is written into a staging folder
first. When that write fails (a full disk, a quota, no permission, a read-only or vanished folder),
:func:`reported_write_failures` removes the partial staging folder (where the filesystem allows
it) and raises :class:`~stim_hf.errors.StorageError`, whose message names the cause, the folder and
what is left intact (the last complete checkpoint a resume would use).

torch does not say why a write failed: on a full disk ``torch.save`` ends in ``RuntimeError:
[enforce fail at inline_container.cc:672] . unexpected pos ...``, without an errno. So when a
failure carries no ``OSError``, the folder is asked: a 1 MiB probe file is written and fsynced
there, and the error the OS gives for it is the cause. A probe that succeeds means the failure was
no storage problem, and the original error goes on unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from stim_hf.errors import StimError, StorageError

PROBE_BYTES = 1 << 20
"""Size of the probe file: more than a full filesystem has left after a failed write, less than any checkpoint."""
_PROBE_NAME = ".stim_hf-write-probe"
# An errno inside a message (safetensors: "Os { code: 28, kind: StorageFull, ... }", Rust: "(os error 28)").
_ERRNO_IN_MESSAGE = re.compile(r"(?:\bcode: |os error )(\d+)")
_VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ESTALE)
_WRITE_ONLY_ERRNOS = tuple(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS) if code)


def _remedy(code: int, folder: str, flag: str) -> str:
    """What the user can do about a failed write with errno ``code``."""
    if code == errno.ENOSPC:
        return f"free space on that filesystem, or set {flag} to a folder on one with room"
    if code == getattr(errno, "EDQUOT", -1):
        return f"free some of your quota there (or ask for more), or set {flag} to a folder elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return f"make '{folder}' writable for this user, or set {flag} to another folder"
    if code == errno.EROFS:
        return f"that filesystem is mounted read-only: set {flag} to a folder on a writable one"
    if code in _VANISHED:
        return (
            f"check that '{folder}' stays in place (a clean-up job, an unmounted or network filesystem) and run again"
        )
    if code == errno.EIO:
        return "the storage reported an I/O error: check the disk or the network filesystem, then run again"
    return f"check '{folder}' and its filesystem, then run again"


def os_error_of(error: BaseException) -> OSError | None:
    """The ``OSError`` (with an errno) behind ``error``: itself, one of its causes, or an errno its message names."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current
        match = _ERRNO_IN_MESSAGE.search(str(current))
        if match and int(match.group(1)) in errno.errorcode:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    return None


def probe_write(folder: str) -> OSError | None:
    """Write and fsync a :data:`PROBE_BYTES` file in ``folder`` and remove it: the OS's error for it, or None."""
    path = os.path.join(folder, f"{_PROBE_NAME}-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        return error
    try:
        os.write(fd, bytes(PROBE_BYTES))
        os.fsync(fd)
    except OSError as error:
        return error
    finally:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
    return None


def describe_size(count: int) -> str:
    """``3.4 MB``: a byte count for a message."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _free_space(folder: str) -> str | None:
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # gone, or no statvfs (Windows)
        return None
    return f"{describe_size(stat.f_bavail * stat.f_frsize)} free there"


def _remove(partial: Sequence[str], folder: str) -> str:
    """Remove the partial folders; what to say about them."""
    said = []
    for path in partial:
        if not os.path.lexists(path):
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:
            said.append(
                f"the partial folder '{path}' could not be removed ({error.strerror or error}): delete it once the "
                "filesystem allows it"
            )
            continue
        said.append(f"the partial folder '{path}' was removed")
    return "; ".join(said)


def storage_error(
    error: BaseException,
    what: str,
    folder: str,
    partial: Sequence[str] = (),
    intact: Callable[[], str] | None = None,
    flag: str = "output_dir",
    needed: Callable[[], str | None] | None = None,
) -> StorageError | None:
    """The :class:`StorageError` for ``error``, raised writing ``what`` into ``folder``; None for no write failure.

    ``partial``: staging folders created before the write began: each is removed (where the
    filesystem allows it), and one that is gone is the cause (it vanished). ``intact``: says, after
    the clean-up, what is left as it was (the last complete checkpoint). ``flag``: the setting that
    names the folder (``output_dir``, ``--output``). ``needed``: how much such a write takes, in
    words (``a checkpoint of this run takes about 3.4 MB``), said beside the free space on a full disk.
    """
    if isinstance(error, StimError):
        return None
    cause = os_error_of(error)
    vanished = next((path for path in partial if not os.path.lexists(path)), None)
    if cause is None and vanished is not None:
        cause = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), vanished)
    if cause is None:
        where = next((path for path in (*partial, folder) if os.path.isdir(path)), None)
        cause = probe_write(where) if where else FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), folder)
    if cause is None:
        return None
    code = cause.errno or 0
    removed = _remove(partial, folder)
    details = [errno.errorcode.get(code, f"errno {code}")]
    if code == errno.ENOSPC:  # (a quota is not the filesystem's free space)
        free = _free_space(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder)))
        size = needed() if needed is not None else None
        details += [free] if free else []
        details += [size] if size else []
    elif code in _VANISHED:
        gone = vanished or cause.filename or folder
        details.append(f"'{gone}' vanished while it was being written")
    parts = [f"could not write {what} to '{folder}': {os.strerror(code)} ({', '.join(map(str, details))})"]
    parts += [removed] if removed else []
    parts += [intact()] if intact is not None else []
    parts.append(_remedy(code, folder, flag))
    failure = StorageError("; ".join(parts))
    failure.errno = code  # the message stays the one line above (two constructor arguments would prefix it)
    return failure


def stray_write_failure(error: BaseException) -> StorageError | None:
    """A :class:`StorageError` line for an ``OSError`` that can only come from a write (no space, a quota, a
    read-only filesystem) raised outside the guarded writes (the run's records, a report); None for any other error."""
    cause = error if isinstance(error, OSError) else None
    if cause is None or cause.errno not in _WRITE_ONLY_ERRNOS:
        return None
    name = cause.filename or _file_in_traceback(cause)
    where = f"'{name}'" if name else "a file"
    folder = os.path.dirname(os.path.abspath(name)) if name else "its folder"
    failure = StorageError(
        f"could not write {where}: {os.strerror(cause.errno)} ({errno.errorcode[cause.errno]}); "
        + _remedy(cause.errno, folder, "the output")
    )
    failure.errno = cause.errno
    return failure


def _file_in_traceback(error: BaseException) -> str | None:
    """The name of the file being written where ``error`` was raised (a write's OSError names none), if in reach."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):  # the innermost first
        for value in frame.f_locals.values():
            mode = getattr(value, "mode", "")
            writing = isinstance(mode, str) and any(flag in mode for flag in "wax+")
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str) and writing:
                return value.name
    return None


@contextmanager
def reported_write_failures(
    what: str,
    folder: str,
    partial: Sequence[str] = (),
    intact: Callable[[], str] | None = None,
    flag: str = "output_dir",
    needed: Callable[[], str | None] | None = None,
) -> Iterator[None]:
    """Turn a failed write inside the block into one :class:`StorageError` line (see :func:`storage_error`).

    Errors that are no write failure (a bug, a :class:`~stim_hf.errors.StimError`, a kill) go on unchanged.
    """
    try:
        yield
    except Exception as error:
        failure = storage_error(error, what, folder, partial, intact, flag, needed)
        if failure is None:
            raise
        raise failure from error
