"""Writing files so that faults cannot tear them: atomic replace, storage errors that name the file, locks.

Why one module: records, partial states, checkpoints and caches are written by many layers; each write must
survive a full disk, a read-only folder, a kill mid-write and a second process writing the same file. Every
writer goes through :func:`atomic_write`: the data lands in a uniquely named temporary file in the target's
folder (created when missing), is flushed to disk and renamed over the target. A failure leaves the previous
file untouched, removes the temporary file and raises :class:`~harness.errors.StorageError` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import tempfile
from typing import IO, Callable, Iterator, Optional

from .errors import StorageError

#: how long a run waits for another process that holds the same lock before it says so on stderr
LOCK_NOTICE_S = 2.0


def describe_os_error(e: OSError) -> str:
    """A short reason for the common storage faults (the exception text for the others)."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the folder is read-only or not writable by this user"
    return e.strerror or str(e)


def storage_error(e: OSError, path: str, what: str, hint: str = "") -> StorageError:
    """One-line :class:`StorageError`: which file, what was being written, why, and what to do."""
    fix = hint or "free space or choose a writable folder, then re-run the same command (finished work is kept)"
    return StorageError(f"cannot write {what} {path}: {describe_os_error(e)}; {fix}")


def ensure_dir(folder: str, what: str, option: str = "") -> str:
    """Create ``folder`` (and parents) or raise :class:`StorageError` naming it (and its option)."""
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as e:
        raise storage_error(e, folder, what, f"pass a writable folder{' as ' + option if option else ''}") from e
    return folder


def ensure_writable_dir(folder: str, what: str, option: str = "") -> str:
    """Create ``folder`` and prove it accepts a file now, before any work (a read-only results folder
    must fail in the first second, not after an hour of computation)."""
    ensure_dir(folder, what, option)
    try:
        fd, probe = tempfile.mkstemp(prefix=".harness-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise storage_error(e, folder, what, f"pass a writable folder{' as ' + option if option else ''}") from e
    return folder


def atomic_write(path: str, write: Callable[[IO[bytes]], None], what: str) -> str:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, and rename it to ``path``.

    Two processes writing the same path each use their own temporary file, so the result is one complete
    version, never a mix. On any error the temporary file is removed and ``path`` keeps its old content.
    """
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder, f"folder for {what}")
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise storage_error(e, path, what) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return path


def atomic_write_text(path: str, text: str, what: str) -> str:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), what)


def atomic_torch_save(obj: object, path: str, what: str) -> str:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), what)


def sha256_file(path: str, limit: Optional[int] = None, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file (of its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            b = f.read(chunk if left is None else min(chunk, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str, what: str) -> Iterator[None]:
    """Hold an inter-process lock on ``path + ".lock"`` (``filelock``, which huggingface_hub depends on).

    A second process asking for the same lock waits (saying so once on stderr) until the first releases it;
    the lock file lives beside ``path`` so runs sharing a results folder or cache see the same lock.
    """
    from filelock import FileLock, Timeout

    lock_path = path + ".lock"
    ensure_dir(os.path.dirname(os.path.abspath(lock_path)), f"folder for the lock of {what}")
    lock = FileLock(lock_path)
    try:
        try:
            lock.acquire(timeout=LOCK_NOTICE_S)
        except Timeout:
            print(f"harness: waiting for another run that is writing {what} {path} (lock {lock_path})",
                  file=sys.stderr)
            lock.acquire()
    except OSError as e:
        raise storage_error(e, lock_path, f"lock for {what}") from e
    try:
        yield
    finally:
        lock.release()
