"""Write a trained run's adapter as files people can share (`nearl.store.adapter_files` is the library).

    python -m nearl.export --checkpoint runs/roco --out adapters/roco      # its last.pt
    python -m nearl.export --checkpoint runs/roco/best.pt --out adapters/roco --overwrite
    python -m nearl.export --checkpoint runs/roco --out adapters/roco --license cc-by-4.0 --push-to-hub me/roco
    python -m nearl.export --out adapters/roco --push-to-hub me/roco     # push a folder already written

DIR receives adapter_model.safetensors (the learnable weights only, no backbone), adapter_config.json
(method, every hyper-parameter, task, class names, the backbone's name, source, seed and
fingerprint, the nearl version), README.md (a model card) and train_images.json (hashes of the
training images' bytes, when the checkpoint recorded them): a layout that can be pushed to the
Hugging Face Hub as it is; a local backbone file or folder is named, never its path. --push-to-hub
uploads it (huggingface_hub's token: HF_TOKEN, or `hf auth login`); a push that fails leaves the folder
written, and says how to push it again.
`nearl.load(DIR)`, `nearl.from_pretrained(DIR or Hub repo id)` and `--adapter DIR` of nearl.evaluate /
nearl.predict read it back, and refuse another backbone (`model.save_pretrained(DIR)` writes the same
folder from Python).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from nearl.argtypes import Parser
from nearl.errors import run_cli
from nearl.logging_utils import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m nearl.export", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint file or run directory (its last.pt); required unless "
                   "--push-to-hub pushes the adapter already in --out")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.add_argument("--pretrained", help="read the backbone weights (to fingerprint them) from here instead of the "
                   "checkpoint's source: a local copy of the same weights; the adapter still records the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--license", help="the adapter's license, stated in its model card (e.g. apache-2.0, cc-by-4.0, "
                   "other); default: none stated, and the card says so. Mind the training data's terms")
    hub = p.add_argument_group("the Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="OWNER/NAME", help="then upload the folder to this Hub repository "
                     "(created if missing), with huggingface_hub's token (HF_TOKEN, or `hf auth login`)")
    hub.add_argument("--private", action="store_true", help="create the repository private")
    hub.add_argument("--revision", help="push to this branch (created if missing; default main)")
    hub.add_argument("--commit-message", help="the commit's message")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """The command line; returns the folder written. User mistakes raise UserError (see cli())."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.push_to_hub is None:
        parser.error("--checkpoint is required (without it, --push-to-hub pushes the adapter already in --out)")
    hub_only = [f for f, v in (("--private", args.private), ("--revision", args.revision),
                               ("--commit-message", args.commit_message)) if v]
    if hub_only and args.push_to_hub is None:
        parser.error(f"{', '.join(hub_only)} apply to --push-to-hub")
    writing = [f for f, v in (("--license", args.license), ("--pretrained", args.pretrained),
                              ("--overwrite", args.overwrite)) if v]
    if writing and args.checkpoint is None:
        parser.error(f"{', '.join(writing)} apply to writing the folder from --checkpoint")
    from nearl.store.adapter_files import CONFIG_FILE, WEIGHTS_FILE, export_checkpoint  # torch: after the parse

    setup_logging()
    out = Path(args.out)
    if args.checkpoint is not None:
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite,
                                pretrained="checkpoint" if args.pretrained is None else args.pretrained,
                                license=args.license, hub_repo=args.push_to_hub)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        images = " and train_images.json" if (out / "train_images.json").is_file() else ""
        print(f"wrote {out / WEIGHTS_FILE}, {out / CONFIG_FILE}, {out / 'README.md'}{images} ({size / 1e6:.2f} MB)")
    if args.push_to_hub is not None:
        print(f"pushed to {_push(out, args)}")
    return out


def _push(out: Path, args: argparse.Namespace) -> str:
    """Upload the folder; a failure says that the folder is written and how to push it again."""
    from nearl.errors import UserError
    from nearl.store.pretrained import push_to_hub

    try:
        return push_to_hub(out, args.push_to_hub, private=True if args.private else None, revision=args.revision,
                           commit_message=args.commit_message)
    except UserError as err:
        if args.checkpoint is None:  # the folder as it was: nothing more to say
            raise
        again = f"python -m nearl.export --out {out} --push-to-hub {args.push_to_hub}"
        raise UserError(f"{err}; the adapter is written in {out}: push it with `{again}` once that is mended") from None


def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.export"))


if __name__ == "__main__":
    cli()
