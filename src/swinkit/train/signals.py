"""SIGTERM and SIGINT during training: stop at the next optimizer step boundary, save, exit.

A cluster that preempts a job sends SIGTERM (and SIGKILL a grace period later); Ctrl-C sends
SIGINT. The handler only records the signal: the training loop reads `requested` at each step
boundary (under torchrun every rank takes the largest over all ranks, so they stop at the same
step), writes a resumable checkpoint and returns. The same signal arriving again at once (a
terminal's Ctrl-C reaches torchrun and every rank, and torchrun passes it on once more) changes
nothing; one sent later than `FORCE_AFTER_S` means "now": it raises KeyboardInterrupt, and the
previous checkpoint pair stays as it was.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("swinkit.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER_S = 2.0


class StopSignals:
    """While entered (in the main thread), SIGTERM / SIGINT set `requested` to the signal number."""

    def __init__(self, announce: bool = True):
        self.requested = 0  # the first signal's number; 0: none
        self.announce = announce  # log the request (rank 0)
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = signum, now
            if self.announce:
                log.warning("%s: stopping after this optimizer step (a checkpoint is saved; resume with --resume)",
                            signal.Signals(signum).name)
        elif now - self._first_at > FORCE_AFTER_S:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopping now, without saving")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn` for training: workers share the terminal's process group (and a
    cluster may signal every process of a job), yet must keep loading until the main process has
    finished its step and saved; it shuts them down itself. SIGINT is ignored; a first SIGTERM too,
    a second one (the main process's `terminate()` of a worker that hangs) still ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def first_sigterm(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first_sigterm)
