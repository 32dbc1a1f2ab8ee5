"""Evaluate NEARL-CLIP: image-text retrieval Recall@1/5/10 and prompt-based classification.

    python -m nearl.evaluate --checkpoint runs/demo                # a trained run (its last.pt)
    python -m nearl.evaluate --checkpoint runs/demo/best.pt --data test.csv --out results/
    python -m nearl.evaluate --adapter adapters/demo --data test.csv   # a folder of python -m nearl.export
    python -m nearl.evaluate --model ViT-B-16 --pretrained openai --task classification \\
        --data split.json --root images/                          # zero-shot: the frozen CLIP

Without --checkpoint the model is freshly built, which computes exactly the frozen CLIP (W_up
starts at zero), i.e. the zero-shot baseline (`--method zeroshot` says so by name). A checkpoint
records its method (nearl, alta, clip-adapter, coop, linear-probe, zeroshot: nearl/methods/), and
the same method is rebuilt from it. Without --data the embedded demo set is used.
Results go to stdout as a Markdown table and, with --out DIR, to DIR/results.json and
DIR/results.md. A checkpoint or adapter records the images it was trained on (by path and by a hash
of their bytes, so copies elsewhere count): evaluating on some of them is refused unless
--allow-train-data (then the table says how many).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, Optional, Sequence

from nearl.argtypes import Parser
from nearl.cli_args import add_model_source
from nearl.errors import run_cli
from nearl.evaluation.config import EvalConfig, eval_flag_fields
from nearl.training.config import argparse_kwargs, option_strings


def build_parser() -> argparse.ArgumentParser:
    """The parser: the model's source (cli_args.add_model_source), then one flag per other EvalConfig
    field (nearl/evaluation/config.py holds their defaults and help)."""
    p = Parser(prog="python -m nearl.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(p)
    for f in eval_flag_fields():
        p.add_argument(*option_strings(f), **argparse_kwargs(f))
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    """What `nearl.evaluation.evaluate` takes from a command line."""
    return EvalConfig.from_namespace(build_parser().parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line; returns the report. User mistakes raise UserError (see cli())."""
    config = parse_config(argv)
    from nearl.evaluation.run import evaluate  # torch, the backbones and the data readers: after the parse

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nearl").setLevel(logging.INFO)
    return evaluate(config)


def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.evaluate"))


if __name__ == "__main__":
    cli()
