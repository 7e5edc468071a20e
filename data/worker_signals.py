"""DataLoader workers that survive the stop signals meant for the training process.

A terminal's Ctrl-C, ``timeout``, ``kill -- -PGID``, torchrun (which signals each rank's
process group) and Slurm (each task's group, or every process of the step under cgroup
tracking) deliver SIGTERM / SIGINT / SIGUSR1 to a rank *and* to its DataLoader workers.
torch's workers die of them (SIGTERM through the handler torch installs in each worker,
SIGINT as a KeyboardInterrupt), and the rank then fails with "DataLoader worker (pid N) is
killed by signal" before it can write the checkpoint the signal asked for.

So a worker blocks these signals and leaves them to one thread that waits for them. A
SIGTERM from the worker's parent is torch ending a worker that did not stop in time
(``Process.terminate``) and ends it, as torch's own handler would; so does any SIGTERM once
the parent is gone. Every other one is dropped: the rank got it too, and it stops its
workers itself once its checkpoint is written. A worker's children (a ``pipe:`` command)
inherit the blocked signals; they end when the worker closes their pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

TRAINER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})


def shield_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker outlives signals meant for its rank."""
    parent = os.getppid()
    # Threads inherit the mask: every thread the worker starts from here on leaves these
    # signals to the waiting thread (one thread that does not block them would take them).
    signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)
    threading.Thread(
        target=_wait_for_signals, args=(parent,), name="clipline-worker-signals", daemon=True
    ).start()


def _wait_for_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(TRAINER_SIGNALS)
        if info.si_signo == signal.SIGTERM and (info.si_pid == parent or os.getppid() != parent):
            # Status 0, as torch's own worker handler exits: the parent's SIGCHLD handler
            # would report a nonzero status as a failed worker.
            os._exit(0)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Holds back the trainer's stop signals in this thread while DataLoader workers fork.

    Between the fork and :func:`shield_worker`, a worker runs torch's own handlers; with the
    signals blocked in the forking thread, workers (and the pin-memory thread) start with
    them blocked and miss nothing. A signal that arrives meanwhile is delivered here on exit.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_workers(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)`` with :func:`signals_held`: where a DataLoader forks its workers.

    The loader's ``worker_init_fn`` must be :func:`shield_worker`: its workers start with the
    signals blocked, and only its thread takes them (torch's ``terminate()`` included).
    """
    workers = getattr(loader, "num_workers", 0)
    assert not workers or getattr(loader, "worker_init_fn", None) is shield_worker, loader
    with signals_held():
        return iter(loader)
