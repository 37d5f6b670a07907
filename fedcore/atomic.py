"""Atomic file writes: a crash, a full disk or a power cut leaves the old file or the new one.

The one way fedcore replaces a file it must not lose or tear (the privacy ledger, the DP-SGD
accountant's state, the plan request queue, the frozen-weights cache, enrolment files,
checkpoints): write a temporary file in the same folder, fsync it, rename it over the target,
fsync the folder (so the rename itself survives a power cut). On any failure before the
rename the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

__all__ = ["fsync_folder", "write_atomically"]


def write_atomically(
    path: Path, data: bytes | Iterable[bytes | memoryview], *, mode: int = 0o644
) -> None:
    """Replace ``path`` by ``data`` (bytes, or pieces written in turn), atomically and
    durably; the folder is created if missing. ``mode`` is the new file's permissions (less
    the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name per write: concurrent writers never share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in (data,) if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it) durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
