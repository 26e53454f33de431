"""Crash-safe file writes shared by every local record (sandbox registry, command ledgers), and
the one range copy (kernel first) that materialize and criu_pages use.

A crash leaves the old file or the new one, never half of one. No policy here.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_into(fd: int, view: memoryview, offset: int = 0) -> int:
    """Read from `offset` of `fd` until `view` is full or the file ends: the bytes read. Each
    slice taken of `view` is released before returning (it may be a mapping's, to be closed)."""
    done = 0
    while done < len(view):
        with view[done:] as rest:
            n = os.preadv(fd, [rest], offset + done)
        if n == 0:
            break
        done += n
    return done


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> int:
    """Copy up to `length` bytes from `src_off` of `src_fd` to `dst_off` of `dst_fd`, in the kernel
    where the filesystems allow (`copy_file_range`), else through `pread`/`pwrite`. The bytes
    copied: fewer than `length` only where the source ends first."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
            if n == 0:
                break
            done += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while done < length:  # across filesystems where copy_file_range will not go
        buf = os.pread(src_fd, min(length - done, 8 << 20), src_off + done)
        if not buf:
            break
        done += os.pwrite(dst_fd, buf, dst_off + done)
    return done
