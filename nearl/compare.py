"""The `python -m nearl.compare` (`nearl-compare`) command line over `nearl.comparison.compare`; its
options and their description are in nearl/comparison/options.py (`python -m nearl.compare --help`).

    python -m nearl.compare --max-steps 2 --seeds 0,1 --out runs/cmp          # embedded demo set, CPU
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from nearl.comparison.options import build_parser, parse_config  # noqa: F401 (no torch: the stack comes after the parse)
from nearl.errors import run_cli
from nearl.logging_utils import setup_logging


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line; returns the report. User mistakes raise UserError (see cli())."""
    setup_logging()
    config = parse_config(argv)  # the CompareConfig the flags give
    from nearl.comparison.run import compare

    return compare(config)


def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.compare"))


if __name__ == "__main__":
    cli()
