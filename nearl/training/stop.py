"""SIGTERM, what Slurm, `docker stop` and systemd send before they kill, stops a training run cleanly.

While the training loop runs (`SigtermStop.deferred`), the signal is only noted: the step under way
finishes, and at that step boundary the run saves last.pt and raises `errors.Terminated`, whose
message says where it stopped and how to continue; the folder's lock is released on the way out
(run.claim_out), and the command line prints that one line and exits with status 143 (128 + 15).
Under torchrun every rank takes that decision together (the flag travels with the step's own
all-reduce, loop.GradientRun._reduce_group). Outside the loop (reading the data, building the model,
a method fitted on cached features) there is no step to finish: the signal stops the run at once,
nothing saved, the lock released. Only the main thread takes signals: a run in another thread
keeps the default.

DataLoader workers (training and validation) forked while the loop runs must outlive a SIGTERM sent
to the whole process group, as Slurm's and systemd's are: torch's workers die on one, and the run
would crash on the lost worker instead of stopping. In such a child SIGTERM is blocked and one
thread takes it (`_after_fork`): sent by its parent (the DataLoader's own terminate() of a stuck
worker) it exits, as torch's worker does; from anyone else it is ignored, since the run, sent it
too, stops its workers at the step boundary.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import Terminated

_DEFERRING = [0]  # how many SigtermStop are deferring in this process (a forked child sees the count)


def _after_fork() -> None:
    """In a child forked while a training loop runs: SIGTERM blocked, taken by a thread (module docstring)."""
    if not _DEFERRING[0]:
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def take() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take, name="nearl-sigterm", daemon=True).start()


if hasattr(os, "register_at_fork") and hasattr(signal, "sigwaitinfo"):  # Linux (macOS spawns its workers)
    os.register_at_fork(after_in_child=_after_fork)


class SigtermStop:
    """`requested`: whether SIGTERM came (while `installed`); `deferring`: whether the loop acts on it."""

    def __init__(self) -> None:
        self.requested = False
        self.deferring = False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not self.deferring:
            raise Terminated("stopped by SIGTERM outside the training loop: nothing was saved")

    @contextmanager
    def installed(self) -> Iterator["SigtermStop"]:
        """The handler for the duration of a run; the previous one back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """The training loop: SIGTERM is noted, and acted on at the next step boundary."""
        self.deferring = True
        _DEFERRING[0] += 1
        try:
            yield
        finally:
            _DEFERRING[0] -= 1
            self.deferring = False
