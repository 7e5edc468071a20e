"""One writer per directory: an OS lock on a file, which names its holder.

``clipline pretrain`` holds ``RUN_DIR/.lock`` and ``clipline eval --run`` holds
``RUN_DIR/eval/.lock`` while they write there; a second one fails at once with the holder's
host and PID instead of overwriting the first one's checkpoints, metrics or results.

The lock is an OS lock (``flock``), not a lock file's existence: the kernel drops it when
the holder dies, ``kill -9`` included, so a crashed run never blocks its own resume. A
forked child would share it, and DataLoader workers can outlive a killed trainer by seconds
(they poll for their parent), so forked children close their copy at once: the lock lives
exactly as long as its holder. A second holder is refused whether it is another process or
the same one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

_open_locks: weakref.WeakSet[DirLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    # Closing (never unlocking) the child's copy leaves the parent's lock in place.
    for lock in list(_open_locks):
        if lock._file is not None:
            lock._file.close()
            lock._file = None


os.register_at_fork(after_in_child=_forget_locks_in_child)


class DirLock:
    """An exclusive lock on the file ``path`` for as long as this process holds it open.

    Use as a context manager, or :meth:`acquire` and then :meth:`release` in a ``finally``.

    Args:
        path: The lock file (created if missing; never deleted, which would race).
        busy: What a refusal says first, e.g. "another clipline pretrain is training into
            runs/x"; the holder (PID, host, since when) and the way out follow.
    """

    def __init__(self, path: str | Path, busy: str) -> None:
        self.path = Path(path)
        self.busy = busy
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises naming the process that has it.

        Raises:
            ValueError: Another holder has it: another process, or another DirLock of this one.
        """
        f = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno != errno.EWOULDBLOCK:
                # Some cluster filesystems (Lustre without -o flock) refuse locks outright.
                log.warning(
                    "cannot lock %s (%s); a second writer into %s would go unnoticed",
                    self.path,
                    exc,
                    self.path.parent,
                )
                return
            raise ValueError(
                f"{self.busy} ({describe_holder(self.path)}); wait for it to end or stop it "
                "(the lock goes with the process, also if it is killed)"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(holder) + "\n")
        f.flush()
        self._file = f
        _open_locks.add(self)

    def release(self) -> None:
        """Gives the lock up (a no-op when it is not held)."""
        if self._file is None:
            return
        _open_locks.discard(self)
        self._file.close()  # the last descriptor closed releases the lock
        self._file = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def describe_holder(path: str | Path) -> str:
    """The lock's holder as it wrote itself down: "PID 123 on host gpu-a since ..."."""
    try:
        holder = json.loads(Path(path).read_text())
        return f"PID {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that has not yet written its name into {path}"
