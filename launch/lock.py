"""One writer per directory: an OS lock on a file, which names its holder.

``clipline pretrain`` holds ``RUN_DIR/.lock`` and ``clipline eval --run`` holds
``RUN_DIR/eval/.lock`` while they write there; a second one fails at once with the holder's
host and PID instead of overwriting the first one's checkpoints, metrics or results.

The lock is a POSIX record lock (``fcntl.lockf``), not a lock file's existence: the kernel
drops it when the holder dies, ``kill -9`` included, so a crashed run never blocks its own
resume. Unlike ``flock``, it is held by the process and not by the open file, so the
DataLoader workers a trainer forks, which may outlive a killed trainer by seconds, do not
keep it; and it also works across the nodes of an NFS mount. The holder must not open and
close the lock file by another descriptor: for POSIX locks, that releases the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# Locks this process holds, by resolved path. A caller that failed between taking a lock and
# the code that releases it leaves its descriptor open; closing that one later would drop a
# lock taken again since (POSIX locks belong to the process), so the next taker closes it now.
_held: dict[Path, IO[str]] = {}


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
            ValueError: Another process holds the lock.
        """
        key = self.path.resolve()
        stale = _held.pop(key, None)
        if stale is not None:
            stale.close()
        f = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
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
        self._file = _held[key] = f

    def release(self) -> None:
        """Gives the lock up (a no-op when it is not held)."""
        if self._file is None:
            return
        _held.pop(self.path.resolve(), None)
        self._file.close()  # closing the descriptor releases the POSIX lock
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
