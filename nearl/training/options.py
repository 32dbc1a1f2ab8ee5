"""The options of a training run: the parser, and the arguments a resumed run takes from its
checkpoint. `nearl.train` is the command line over them; `parse_args([...])` gives what `fit` takes.
Imports no torch (the methods' options come from nearl/methods/options.py): --help answers at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from nearl import argtypes as A
from nearl.methods.options import add_method_options, fixed_on_resume
from nearl.training import config_file
from nearl.training.config import AUTO, TrainConfig, argparse_kwargs, flag_fields, option_string, option_strings

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
going through the adapted text tower every step, + lambda_q * query alignment (nearl/model/classify.py).

Outputs in --out: metrics.jsonl (one line per optimizer step and per validation), curves.png,
last.pt / last.prev.pt (resume points), best.pt (best validation score: the task's main metric or
--monitor), config.yaml (the settings; --config runs them again).
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
            if list(groups) == ["model"]:  # each method's own options, after the model group (nearl/methods/options.py)
                add_method_options(p)
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument(*option_strings(f), **argparse_kwargs(f))
    # what to do with the settings, not settings themselves (TrainConfig has no field for them)
    groups["run"].add_argument("--config", metavar="FILE", help="read the settings from a YAML file, such as the "
                               "config.yaml every run writes in its folder; flags given on the command line win")
    groups["run"].add_argument("--print-config", action="store_true", help="print the settings this command line "
                               "resolves to, as a config file, and exit without training")
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


def auto_resume(out: str) -> Optional[str]:
    """--resume auto: the run in `out` when it has a checkpoint to continue from, else None (a new run;
    a folder holding a run without one is refused when the run claims it, under its lock)."""
    from nearl.store.checkpoint import LAST, PREVIOUS  # torch: after the parse, as --resume's own load

    folder = Path(out)
    return str(folder) if any((folder / name).is_file() for name in (LAST, PREVIOUS)) else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The arguments; --config's file fills in those not given; with --resume, those given in neither
    come from the checkpoint, and those fixing the model's shape (FIXED_ON_RESUME) keep the checkpoint's
    value, with a note in `args.resume_notes` (printed by the run)."""
    return _parse(argv)[0]


def parse_command(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, bool]:
    """(the TrainConfig a command line gives, whether it asked for --print-config)."""
    args, show = _parse(argv)
    return TrainConfig.from_namespace(args), show


def _parse(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, bool]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    path, show = args.__dict__.pop("config"), args.__dict__.pop("print_config")
    args.resume_notes = []
    given = _explicit(parser, argv) - {"config", "print_config"}
    if path is not None:
        for k, v in config_file.checked(config_file.read(path), parser._actions, path).items():
            if k not in given:
                setattr(args, k, v)
                given.add(k)
    if args.resume == AUTO:
        args.resume = auto_resume(args.out)
    if args.resume:
        from nearl.store.checkpoint import load_checkpoint  # torch: after the parse (--help and a bad flag need none)
        from nearl.training.resume import check_resumable, show as _show

        ckpt = load_checkpoint(args.resume)
        check_resumable(ckpt)  # NaN weights: refused before any work
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
    return args, show


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """What `fit` takes from a command line (`parse_args`, with a resume's restored settings)."""
    return parse_command(argv)[0]


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
