"""One driver per run directory: `RunLock`, an exclusive lock on OUTPUT_DIR/.driver.lock held for the
run's lifetime (issue 24, item 2).

Two drivers writing one run directory (a `--resume` started while the first run is still alive, on
another terminal or node) would interleave metrics and write checkpoints twice. The lock is `filelock`'s
`FileLock` (`flock(2)` on Linux, which the kernel releases when its process dies, SIGKILL included), so a
lock left by a killed driver is taken over by the next one without a manual step. Who holds it (host,
pid, start time) is written next to it, in OUTPUT_DIR/.driver.json, so that a refused driver can say.
`evaluate` only reads a run and takes no lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from shared.run_layout import DRIVER_HOLDER, DRIVER_LOCK, RunDirError, write_json_atomic


class RunLockedError(RunDirError):
    """Another driver holds the run directory's lock."""


class RunLock:
    """The exclusive lock of the run directory `root` (created if missing).

    Use as a context manager, or `acquire()` / `release()`.

    Raises:
        RunLockedError: from `acquire`, when another live driver holds the lock (names its host, pid and
            start time, as it recorded them).
        OSError: the directory or the lock file cannot be created.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / DRIVER_LOCK
        self.holder_path = self.root / DRIVER_HOLDER
        self._lock: FileLock | None = None

    def holder(self) -> dict | None:
        """What the current (or last) holder recorded: {"host", "pid", "started"}, or None."""
        try:
            return json.loads(self.holder_path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        """Takes the lock at once (never waits) and records this process as its holder."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.holder() or {}
            raise RunLockedError(
                f"--output-dir: {self.root} is in use by another driver (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to end, "
                "or stop it (its checkpoints stay) and --resume"
            ) from None
        self._lock = lock
        write_json_atomic(
            self.holder_path,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    def release(self) -> None:
        """Releases the lock (the holder record stays, as the last holder's)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
