"""Stop signals: SIGTERM, SIGUSR1 and Ctrl-C become a checkpoint and a clean exit."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


class Preempted(RuntimeError):
    """A stop signal was turned into a checkpoint; the process should exit with ``exit_code``.

    143 (128 + SIGTERM) after SIGTERM or SIGUSR1: what schedulers (Slurm requeue) read as
    "terminated"; 130 (128 + SIGINT) after Ctrl-C, as a shell reports an interrupted command.
    """

    exit_code = 143

    def __init__(self, message: str, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Records SIGTERM, SIGUSR1 (Slurm's pre-emption warning) and Ctrl-C (SIGINT) instead of
    dying mid-step.

    The first one only sets a flag; the loop checks it between steps, all ranks agree, and
    the run checkpoints and stops. Repeats are ignored (Slurm and a launcher may both
    forward one signal), except that a second Ctrl-C stops at once, as Ctrl-C does
    elsewhere: it raises KeyboardInterrupt wherever the process is (a stalled data read
    included), without a checkpoint. Once the loop has ended, the previous handlers are
    back: a signal during the exit that follows acts as it would without clipline.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    # One Ctrl-C can arrive twice within milliseconds (Slurm signals every process of a
    # step and torchrun forwards the same SIGINT); a person's second press comes later.
    SECOND_PRESS_S = 0.5

    def __init__(self, announce: bool = True) -> None:
        self.received: int | None = None
        self.announce = announce
        self._since = 0.0

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received
        if first is None:
            self.received, self._since = signum, time.monotonic()
            if self.announce:
                self._say(signum)
        elif time.monotonic() - self._since < self.SECOND_PRESS_S:
            pass  # the first signal, delivered again
        # torchrun passes a second Ctrl-C on to its ranks as SIGTERM.
        elif signum == signal.SIGINT or (signum == signal.SIGTERM and first == signal.SIGINT):
            raise KeyboardInterrupt("second Ctrl-C: stopped at once, without a checkpoint")

    @staticmethod
    def _say(signum: int) -> None:
        name = signal.Signals(signum).name
        line = f"clipline: {name}: saving a checkpoint after this step, then stopping"
        if signum == signal.SIGINT:
            line += " (Ctrl-C again to stop at once without one)"
        # os.write, not print/logging: the handler may interrupt a write to stderr (the
        # progress bar's), and a buffered stream cannot be re-entered.
        os.write(2, (("\n" if os.isatty(2) else "") + line + "\n").encode())

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
