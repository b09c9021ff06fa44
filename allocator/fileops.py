"""The file operations the disk arena uses, behind one object so tests can inject faults.

Tests subclass :class:`FileOps` (raise ``OSError(ENOSPC)`` from ``pwritev``, return short
reads, flip a byte after ``preadv``...) instead of patching ``os``.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import stat


class FileOps:
    """Thin pass-through to ``os``; every method is positioned I/O (no shared file offset),
    so concurrent readers need no lock."""

    def open(self, path: str, flags: int, mode: int = 0o600, *, dir_fd: int | None = None) -> int:
        return os.open(path, flags, mode, dir_fd=dir_fd)

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


class UnsafePathError(PermissionError):
    """A slab's directory or file is not one this process alone controls (a symlink, a
    hard link, another owner, a directory others may write into)."""


def open_private_dir(directory: str) -> int:
    """Open ``directory`` (``O_DIRECTORY``) and check that only this user can change what is
    in it: owned by our effective uid (or root) and not writable by group or others unless
    sticky. Returns the fd; the caller opens files relative to it (``dir_fd``), so a path
    component swapped after this check cannot redirect them. O(1).
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafePathError(f"{directory} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(f"{directory} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                                  "they could plant a link there that redirects a slab")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private_file(fd: int, path: str) -> os.stat_result:
    """Refuse an opened slab that is not a regular file with one link owned by us. O(1)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file")
    if st.st_nlink != 1:
        raise UnsafePathError(f"{path} has {st.st_nlink} hard links; a slab must have exactly one")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} belongs to uid {st.st_uid}, not to this user")
    return st
