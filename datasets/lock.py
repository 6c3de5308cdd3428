"""One writer per folder: an exclusive lock on a file inside it, holding the owner's pid.

``fcntl.lockf`` (a POSIX record lock) is released by the kernel when the owning process ends, ``kill -9``
included, so a lock left by a dead process never blocks a restart; and forked children (worker pools) do not
inherit it, so a worker outliving its parent holds nothing.
"""
import fcntl
import os


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it and what to do."""


class FolderLock:
    """Hold ``folder/name`` exclusively, or raise LockedError with ``busy(pid)`` as the message."""

    def __init__(self, folder, busy, name=".lock"):
        os.makedirs(folder, exist_ok=True)
        self.name, self.path = name, os.path.join(folder, name)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise LockedError(busy(pid)) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
