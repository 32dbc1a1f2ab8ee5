"""User errors and how the command lines report them.

A `UserError` is a mistake in what the user gave (a file, a flag, a checkpoint that does not fit):
the command lines print it as one line and exit with status 2, as argparse does for a bad flag. Any
other exception is a bug and keeps its traceback. `UserError` is a `ValueError`, so library callers
that catch ValueError keep working.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class UserError(ValueError):
    """Bad input from the user; the message names the argument or file and what was seen."""


class Terminated(BaseException):
    """The run was sent SIGTERM (or a first Ctrl-C) and stopped (nearl/training/stop.py); the message
    says where and what was saved. A BaseException, as KeyboardInterrupt is, so no `except Exception`
    swallows it."""

    def __init__(self, message: str = "", signum: int = 15):
        super().__init__(message)
        self.exit_status = 128 + signum  # what a shell reports for a process that signal ended: 143, 130


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
            prog: str = "nearl") -> int:
    """Call `main(argv)` and return its exit status (an int it returns, else 0); a UserError becomes
    one line on stderr and exit status 2, a run stopped by SIGTERM or Ctrl-C (Terminated) one line and
    143 or 130."""
    try:
        status = main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Terminated as stop:
        print(f"{prog}: {stop}", file=sys.stderr, flush=True)
        return stop.exit_status
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
