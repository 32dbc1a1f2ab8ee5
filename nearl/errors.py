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


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
            prog: str = "nearl") -> int:
    """Call `main(argv)` and return its exit status (an int it returns, else 0); a UserError becomes
    one line on stderr and exit status 2."""
    try:
        status = main(argv)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
