"""A per-rank lock on a local output folder, so two builds of the same rank never write there at once.

``build`` and ``convert`` take it (``relabel_shards.writer.ShardJob.pending``) before they remove stale
temporary files: without it, a second build of the same rank deleted the first one's open temporary shard.
The lock is an exclusive ``flock`` on ``{out}/.{prefix}.rank{r}.lock``; it dies with its process (a killed
build's lock file is simply taken over), and the file is removed when the job ends. Object stores take no
lock: their temporary files are local files with unique names.
"""

from __future__ import annotations

import os
import socket
import threading
import weakref

__all__ = ["OutputInUseError", "RankLock"]


class OutputInUseError(RuntimeError):
    """Another process is writing the same rank's shards into this folder."""


_HELD_LOCKS: dict[str, list[int]] = {}  # lock path -> [fd, holders in this process, pid]
_HELD_GUARD = threading.Lock()


class RankLock:
    """An exclusive ``flock`` on ``path`` for this process, taken now; the file goes with the last holder.

    Jobs of one process share it (tests and notebooks make several jobs on one folder); another process gets
    :class:`OutputInUseError`. The lock file holds the owner's pid and host for that message. Taking it checks
    that the locked file is still the one at ``path`` (a releasing owner may have just removed it). A killed
    owner's lock file is taken over: ``flock`` locks die with their process.

    Raises:
        OutputInUseError: another process holds it.
    """

    def __init__(self, path: str, out: str, rank: int):
        self.path = path
        self._held = False
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): no lock
            return
        with _HELD_GUARD:
            if path in _HELD_LOCKS:
                _HELD_LOCKS[path][1] += 1
            else:
                _HELD_LOCKS[path] = [self._take(fcntl, path, out, rank), 1, os.getpid()]
        self._held = True
        self._finalizer = weakref.finalize(self, _unlock, path)

    @staticmethod
    def _take(fcntl, path: str, out: str, rank: int) -> int:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputInUseError(
                    f"{out}: another build is writing here (rank {rank}, {holder}); wait for it to finish or "
                    "stop it, then rerun") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                return fd
            os.close(fd)  # the owner removed it between our open and our lock: try again

    def release(self) -> None:
        if self._held:
            self._held = False
            self._finalizer()


def _unlock(path: str) -> None:
    with _HELD_GUARD:
        entry = _HELD_LOCKS.get(path)
        if entry is None or entry[2] != os.getpid():  # a forked child never removes its parent's lock
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD_LOCKS[path]
    try:
        os.unlink(path)  # while still holding it, so nobody locks a file that is about to vanish
    except FileNotFoundError:
        pass
    os.close(entry[0])
