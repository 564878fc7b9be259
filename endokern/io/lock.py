"""The exclusive lock a run holds on its output while it lives."""

from __future__ import annotations

import os
from typing import Optional


class LockedError(RuntimeError):
    """Another process holds the lock of a run's output."""


class RunLock:
    """An exclusive, non-blocking lock on a run's files: ``fcntl.flock`` on ``path`` (``<output>.lock``), whose
    content names the holder (pid, host, command). The kernel releases a flock when its process ends in any way,
    ``kill -9`` included, so a stale lock file never blocks a resume; a clean exit also removes the file. A second
    run on the same output raises :class:`LockedError` naming the holder."""

    def __init__(self, path: str, holder: str = "") -> None:
        self.path = path
        self.holder = holder
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    held_by = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
                finally:
                    os.close(fd)
                raise LockedError(f"{self.path} is locked by a run still going ({held_by}); wait for it to end, or "
                                  "give this run another --output") from None
            try:  # the holder before us may have removed the file after we opened it: lock the file now there
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}{': ' + self.holder if self.holder else ''}\n"
                 .encode("utf-8"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it, so no one can be locking this inode as a live lock
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
