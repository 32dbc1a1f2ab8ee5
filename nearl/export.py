"""Write a trained run's adapter as files people can share (`nearl.adapter_files` is the library).

    python -m nearl.export --checkpoint runs/roco --out adapters/roco      # its last.pt
    python -m nearl.export --checkpoint runs/roco/best.pt --out adapters/roco --overwrite

DIR receives adapter.safetensors (the learnable weights only, no backbone), adapter_config.json
(method, every hyper-parameter, task, class names, the backbone's name, source, seed and
fingerprint, the nearl version), README.md (a model card) and train_images.json (hashes of the
training images' bytes, when the checkpoint recorded them): a layout that can be pushed to the
Hugging Face Hub as it is; a local backbone file or folder is named, never its path.
`nearl.load(DIR)` and `--adapter DIR` of nearl.evaluate / nearl.predict read it back, and refuse
another backbone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .argtypes import Parser
from .errors import run_cli
from .logging_utils import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m nearl.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or run directory (its last.pt)")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.add_argument("--pretrained", help="read the backbone weights (to fingerprint them) from here instead of the "
                   "checkpoint's source: a local copy of the same weights; the adapter still records the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """The command line; returns the folder written. User mistakes raise UserError (see cli())."""
    args = build_parser().parse_args(argv)
    from .adapter_files import CONFIG_FILE, WEIGHTS_FILE, export_checkpoint  # torch: after the parse

    setup_logging()
    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                            pretrained="checkpoint" if args.pretrained is None else args.pretrained)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    images = " and train_images.json" if (out / "train_images.json").is_file() else ""
    print(f"wrote {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / 'README.md'}{images} ({size / 1e6:.2f} MB)")
    return out


def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.export"))


if __name__ == "__main__":
    cli()
