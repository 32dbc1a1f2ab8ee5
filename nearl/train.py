"""The `python -m nearl.train` (`nearl-train`) command line over `nearl.training.fit`; its options
and their description are in nearl/training/options.py (`python -m nearl.train --help`).

    python -m nearl.train --max-steps 3 --out runs/demo            # embedded demo set, CPU-sized model
    python -m nearl.train --resume runs/demo                        # continue exactly where it stopped
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from nearl.errors import run_cli
from nearl.logging_utils import setup_logging
from nearl.training import config_file
from nearl.training.options import parse_command  # no torch: the run's stack is imported after the parse


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train from a command line; user mistakes raise UserError (see `cli` for the one-line report)."""
    setup_logging()
    config, show = parse_command(argv)  # the TrainConfig the flags (--config's file, --resume's checkpoint) give
    if show:  # --print-config: the settings as a config file, nothing run
        print(config_file.as_yaml(config.to_dict()), end="")
        return {}
    from nearl.training import fit

    return fit(config)


def cli() -> None:
    """The `nearl-train` console script: a user error is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, prog="nearl.train"))


if __name__ == "__main__":
    cli()
