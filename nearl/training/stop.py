"""SIGTERM, what Slurm, `docker stop` and systemd send before they kill, stops a training run cleanly;
so does a first Ctrl-C (SIGINT), and a second Ctrl-C aborts at once.

While the training loop runs (`SigtermStop.deferred`), the signal is only noted: the step under way
finishes, and at that step boundary the run saves last.pt and raises `errors.Terminated`, whose
message says where it stopped and how to continue; the folder's lock is released on the way out
(run.claim_out), and the command line prints that one line and exits with status 143 (128 + 15), or
130 (128 + 2) for Ctrl-C. A first Ctrl-C is answered at once by a line saying that the run stops at
the next step boundary and that a second Ctrl-C aborts without saving; that second one raises
KeyboardInterrupt where the run is (the lock released, exit status 130, last.pt as last saved).
Under torchrun every rank takes that decision together (the flags travel with the step's own
all-reduce, loop.GradientRun._reduce_group): SIGTERM if any rank was sent it, else SIGINT.
Outside the loop (reading the data, building the model, a method fitted on cached features) there
is no step to finish: SIGTERM stops the run at once, nothing saved, the lock released, and SIGINT
does what it did before the run (KeyboardInterrupt). Only the main thread takes signals: a run in
another thread keeps the default; a SIGINT ignored when the run starts (a shell's background job)
stays ignored.

DataLoader workers (training and validation) forked while the loop runs must outlive a SIGTERM or
SIGINT sent to the whole process group, as Slurm's, systemd's and a terminal's Ctrl-C are: torch's
workers die on one, and the run would crash on the lost worker instead of stopping. In such a child
both are blocked and one thread takes them (`_after_fork`): a SIGTERM sent by its parent (the
DataLoader's own terminate() of a stuck worker) ends it, as torch's worker does; any other is
ignored, since the run, sent it too, stops its workers at the step boundary.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

from nearl.errors import Terminated

_DEFERRING = [0]  # how many SigtermStop are deferring in this process (a forked child sees the count)
STOPPING = (signal.SIGTERM, signal.SIGINT)  # the signals the loop stops for, in their flags' order
NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
NOTICE = ("Ctrl-C: the run stops after the step under way, saving it in last.pt; press Ctrl-C again to abort at "
          "once without saving")


def _after_fork() -> None:
    """In a child forked while a training loop runs: SIGTERM and SIGINT blocked, taken by a thread
    (module docstring)."""
    if not _DEFERRING[0]:
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPPING))  # threads started later inherit the mask

    def take() -> None:
        while True:
            info = signal.sigwaitinfo(set(STOPPING))
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=take, name="nearl-sigterm", daemon=True).start()


if hasattr(os, "register_at_fork") and hasattr(signal, "sigwaitinfo"):  # Linux (macOS spawns its workers)
    os.register_at_fork(after_in_child=_after_fork)


def _say(line: str) -> None:
    """A line on stderr from a signal handler, which may have interrupted a write to stderr."""
    try:
        print(line, file=sys.stderr, flush=True)
    except RuntimeError:  # "reentrant call": that write holds the stream's buffer
        os.write(2, (line + "\n").encode())


class SigtermStop:
    """`requested`: whether SIGTERM or SIGINT came (while `installed`), `received` which of them;
    `deferring`: whether the loop acts on them. `announce`: whether this process says the first
    Ctrl-C's notice (under torchrun, rank 0 only); `prog` begins that line."""

    def __init__(self, announce: bool = True, prog: str = "nearl.train") -> None:
        self.requested = False
        self.received: set = set()
        self.deferring = False
        self.announce, self.prog = announce, prog
        self._previous_int = None  # the SIGINT handler before the run's: what Ctrl-C does outside the loop

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        if signum == signal.SIGINT and not self.deferring:  # outside the loop: what it did before the run
            if callable(self._previous_int):
                return self._previous_int(signum, frame)
            raise KeyboardInterrupt
        self.requested = True
        self.received.add(signum)
        if not self.deferring:
            raise self.stopped(signum, "outside the training loop: nothing was saved")
        if signum == signal.SIGINT and self.announce:
            _say(f"{self.prog}: {NOTICE}")

    def flags(self) -> List[float]:
        """One flag per signal of STOPPING, for the step's all-reduce (loop.GradientRun._reduce_group)."""
        return [float(s in self.received) for s in STOPPING]

    @staticmethod
    def agreed(reduced: Sequence[float]) -> Optional[signal.Signals]:
        """The signal every rank stops for, from the flags reduced over ranks: SIGTERM if any rank was
        sent it, else SIGINT, else None."""
        return next((s for s, f in zip(STOPPING, reduced) if f > 0), None)

    @staticmethod
    def stopped(signum: int, where: str) -> Terminated:
        """What the run raises once it stopped for `signum` (exit status 128 + signum)."""
        return Terminated(f"stopped by {NAMES[signum]} {where}", signum=int(signum))

    @contextmanager
    def installed(self) -> Iterator["SigtermStop"]:
        """The handlers for the duration of a run; the previous ones back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_int = signal.getsignal(signal.SIGINT)
        # an ignored Ctrl-C stays ignored; one not set from Python (None) could not be put back
        take_int = self._previous_int not in (signal.SIG_IGN, None)
        if take_int:
            signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
            if take_int:
                signal.signal(signal.SIGINT, self._previous_int)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """The training loop: SIGTERM and SIGINT are noted, and acted on at the next step boundary."""
        self.deferring = True
        _DEFERRING[0] += 1
        try:
            yield
        finally:
            _DEFERRING[0] -= 1
            self.deferring = False
