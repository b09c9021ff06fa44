"""The file operations the disk arena uses, behind one object so tests can inject faults.

Tests subclass :class:`FileOps` (raise ``OSError(ENOSPC)`` from ``pwritev``, return short
reads, flip a byte after ``preadv``...) instead of patching ``os``.
"""

from __future__ import annotations

from collections.abc import Sequence
import os


class FileOps:
    """Thin pass-through to ``os``; every method is positioned I/O (no shared file offset),
    so concurrent readers need no lock."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def pwritev(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            import errno

            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, offset + length)  # file systems without fallocate

    def fstat_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def drop_cache(self, fd: int) -> None:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
