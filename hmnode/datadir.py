"""The data directory: where each file lives, and the lock that gives one agent sole use of it."""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from hmnode.errors import DataDirInUse, UsageError


@dataclass(frozen=True)
class DataDir:
    """A node's data directory and the names of the files in it."""

    path: Path

    @property
    def key_file(self) -> Path:
        return self.path / "node.key"

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def store_dir(self) -> Path:
        return self.path / "state.lmdb"

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def lock_file(self) -> Path:
        return self.path / "agent.lock"

    def create(self) -> None:
        """Create the directory (mode 0700: it holds the key and the control socket)."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create data dir {self.path}: {exc.strerror}") from exc
        if not self.path.is_dir():
            raise UsageError(f"data dir {self.path} exists and is not a directory")

    def lock(self) -> "DataDirLock":
        """Take the data dir's exclusive lock, or raise DataDirInUse naming the holder's pid."""
        return DataDirLock.acquire(self.lock_file)


class DataDirLock:
    """An flock on the data dir's lock file; the kernel drops it when the holder dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> "DataDirLock":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataDirInUse(
                    f"data dir {path.parent} is in use by another hmnode agent (pid {holder}); "
                    "stop it first, or give this one another --data-dir"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Drop the lock; the file stays, so that no racing agent locks a deleted inode."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "DataDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a file just created or renamed into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
