"""The options of a training run: the parser, and the arguments a resumed run takes from its
checkpoint. `nearl.train` is the command line over them; `parse_args([...])` gives what `fit` takes.
Imports no torch (the methods' options come from nearl/method_options.py): --help answers at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .. import argtypes as A
from ..method_options import add_method_options, fixed_on_resume
from .config import TrainConfig, argparse_kwargs, flag_fields, option_string

DESCRIPTION = """Train NEARL-CLIP's adapters on a frozen CLIP backbone (SPEC 3.2).

    python -m nearl.train --max-steps 3 --out runs/demo            # embedded demo set, CPU-sized model
    python -m nearl.train --model ViT-B-16 --pretrained openai --data roco/train/radiology \\
        --val-data roco/validation/radiology --epochs 10 --batch-size 128 --precision bf16 --out runs/roco
    python -m nearl.train --task classification --data split.json --root images/ --k-shot 16 --out runs/fs
    python -m nearl.train --resume runs/roco                        # continue exactly where it stopped
    torchrun --nproc_per_node=4 -m nearl.train ... --batch-size 64  # global batch 256
    python -m nearl.train --method alta --multiview --data studies.csv --out runs/alta   # a baseline

--method picks the adaptation (nearl/methods/): nearl (default), alta, clip-adapter, coop,
linear-probe, zeroshot. All share this data pipeline, loop, checkpoints (which record the method)
and evaluation; linear-probe fits on cached features (one L-BFGS iteration per step) and zeroshot
trains nothing (it validates and writes a checkpoint naming itself).

Retrieval: the symmetric CLIP loss (gathered across ranks with gradient) + lambda_q * query
alignment. Classification: cross-entropy over logit_scale * cos(image, class prompts), the prompts
going through the adapted text tower every step, + lambda_q * query alignment (nearl/classify.py).

Outputs in --out: metrics.jsonl (one line per optimizer step and per validation), curves.png,
last.pt / last.prev.pt (resume points), best.pt (best validation mean recall or accuracy).
Checkpoints hold the learnable parameters only (about 1.4M numbers for ViT-B-16), never the backbone.

One run per folder: a folder holding a run is refused unless --resume continues it or --overwrite
deletes it; train.lock (pid, host) keeps a second process out while the run lives. A non-finite
loss or gradient stops the run (exit 2) without applying or saving it, unless --skip-nonfinite N.
On --resume, settings given again take effect (optimiser, schedule, data); the model's shape
(--model, --num-queries, ...) stays the checkpoint's. A changed schedule (--max-steps, --epochs,
--warmup, --min-lr-ratio) is laid out again over the new length, as if the run had started with it,
and the learning rate moves there linearly from its current value over the next max(1, warmup)
steps: it never jumps, and a finished run given more steps warms up again from its floor. A resume
with nothing left to do says so and changes nothing (exit 0); a checkpoint holding NaN is refused.
SIGTERM (Slurm, docker stop, systemd) stops the run at the next step boundary: last.pt saved at that
step, train.lock released, one line saying how to resume, exit status 143. So does a first Ctrl-C
(exit status 130); a second Ctrl-C aborts at once without saving.
"""

# Arguments a resumed run does not take from the checkpoint unless given again (one-shot actions).
NOT_RESTORED = {"resume", "overwrite", "force_unlock", "resume_notes"}
# Arguments that fix the model a checkpoint holds: given again with another value on --resume, they
# are reported and the checkpoint's value is kept (its parameters would not fit otherwise).
# The methods' own such options are marked `fixed` where they declare them (nearl/methods/).
FIXED_ON_RESUME = ("method", "task", "model", "seed", "classes") + fixed_on_resume()


# ============================================================================= arguments
def build_parser() -> argparse.ArgumentParser:
    """The parser, one flag per TrainConfig field (nearl/training/config.py holds their defaults and
    help), the methods' options after the model group."""
    p = A.Parser(prog="python -m nearl.train", description=DESCRIPTION,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    A.allow_negative_numbers(p)
    groups = {}
    for f in flag_fields():
        group = f.metadata["group"]
        if group not in groups:
            if list(groups) == ["model"]:  # each method's own options, after the model group (nearl/method_options.py)
                add_method_options(p)
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(option_string(f), **argparse_kwargs(f))
    return p


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests given on the command line (parse again with every default suppressed)."""
    shadow = A.allow_negative_numbers(argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS))
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kw = {"dest": action.dest}
            if isinstance(action, argparse._StoreTrueAction):
                shadow.add_argument(*action.option_strings, action="store_true", **kw)
            elif isinstance(action, argparse.BooleanOptionalAction):
                shadow.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kw)
            else:
                shadow.add_argument(*action.option_strings, nargs=action.nargs, type=action.type, **kw)
    ns, _ = shadow.parse_known_args(list(argv))
    return set(vars(ns))


def resume_dir(resume) -> Path:
    """The run folder a --resume value names (a folder, or a checkpoint file's folder)."""
    res = Path(resume)
    return res if res.is_dir() else res.parent


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments; with --resume, those not given again come from the checkpoint, and those
    fixing the model's shape (FIXED_ON_RESUME) keep the checkpoint's value, with a note in
    `args.resume_notes` (printed by the run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.resume_notes = []
    if args.resume:
        from ..checkpoint import load_checkpoint  # torch: after the parse (--help and a bad flag need none)
        from ..resume import check_resumable, show as _show

        ckpt = load_checkpoint(args.resume)
        check_resumable(ckpt)  # NaN weights: refused before any work
        given = _explicit(parser, argv)
        if "out" not in given:
            args.out = str(resume_dir(args.resume))
            given.add("out")
        saved = ckpt.get("args", {})
        for k, v in saved.items():
            if hasattr(args, k) and k not in given and k not in NOT_RESTORED:
                setattr(args, k, v)
        kept = []
        for k in FIXED_ON_RESUME:
            if k in given and k in saved and getattr(args, k) != saved[k]:
                kept.append(f"--{k.replace('_', '-')} {_show(getattr(args, k))} (checkpoint: {_show(saved[k])})")
                setattr(args, k, saved[k])
        if kept:
            args.resume_notes.append(f"warning: --resume keeps the model the checkpoint holds; ignored: "
                                     f"{', '.join(kept)}. Start a new run (another --out) to change them")
    return args


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """What `fit` takes from a command line (`parse_args`, with a resume's restored settings)."""
    return TrainConfig.from_namespace(parse_args(argv))


def given_settings(argv: Sequence[str]) -> Dict[str, Any]:
    """The settings a list of nearl.train flags gives, parsed as the command line parses them, those
    not given left out (nearl.compare's --train-args and --method-args)."""
    parser = build_parser()
    parsed = vars(parser.parse_args(list(argv)))
    return {k: parsed[k] for k in _explicit(parser, argv)}


def check_flags(config: TrainConfig) -> None:
    """A config built in Python checked as the command line checks each flag's value: a bad one ends as
    that flag would (nearl.compare's runs take its --lr and --weight-decay, which its parser lets by)."""
    for f in flag_fields():
        value, convert = getattr(config, f.name), f.metadata["cli"].get("type")
        if convert is None or value is None or isinstance(value, (bool, list)):
            continue
        try:
            convert(str(value))
        except argparse.ArgumentTypeError as e:
            build_parser().error(f"argument {option_string(f)}: {e}")
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", repr(convert))
            build_parser().error(f"argument {option_string(f)}: invalid {name} value: {str(value)!r}")
