"""Cross-process locks on local lock files (filelock: flock on POSIX).

Local state that several runs on one machine share — outputs under a local storage root, the
model cache, the sample-data cache — is guarded by these. The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so "can I take the lock?" is also the test
for "is its owner still alive?": that is how a run tells the leftovers of a killed run from the
work of a live one.

Lock files are unlinked by their holder before it lets go, so none pile up beside outputs.
filelock re-checks the link count after every flock, so a waiter that opened the file just
before the unlink retries on the new name rather than locking a file nobody else sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_SUFFIX = ".lock"
POLL_S = 0.005


def _lock(path: str | os.PathLike[str], timeout: float) -> FileLock:
    # thread_local=False: a run may take a lock in one thread and let go of it in another.
    # A short poll: these locks are held for a rename or a directory listing, not for long.
    return FileLock(str(path), timeout=timeout, thread_local=False, poll_interval=POLL_S)


def try_hold(path: str | os.PathLike[str]) -> FileLock | None:
    """Take the lock at ``path`` if nobody holds it; None when a live process does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def hold(path: str | os.PathLike[str], timeout: float = -1) -> FileLock:
    """Take the lock at ``path``, waiting for its holder (``timeout`` in seconds, -1 = forever)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path, timeout=timeout)
    lock.acquire()
    return lock


def drop(lock: FileLock) -> None:
    """Unlink the lock file (while still holding it) and let go."""
    with suppress(FileNotFoundError):
        os.unlink(lock.lock_file)
    lock.release(force=True)


@contextmanager
def held(path: str | os.PathLike[str], timeout: float = -1) -> Iterator[None]:
    """Hold the lock at ``path`` for the ``with`` block (waits; ``timeout`` in seconds, -1 = forever)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path, timeout=timeout)
    lock.acquire()
    try:
        yield
    finally:
        drop(lock)
