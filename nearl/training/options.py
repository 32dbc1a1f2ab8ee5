"""The options of a training run: the parser, and the arguments a resumed run takes from its
checkpoint. `nearl.train` is the command line over them; `parse_args([...])` gives what `fit` takes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .. import argtypes as A
from ..checkpoint import load_checkpoint
from ..data.labelled import CLASS_SUBSETS
from ..methods import METHODS, add_method_options, canonical, fixed_on_resume
from ..resume import check_resumable, show as _show
from .tracking import parse_report_to

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
step, train.lock released, one line saying how to resume, exit status 143.
"""

# Arguments a resumed run does not take from the checkpoint unless given again (one-shot actions).
NOT_RESTORED = {"resume", "overwrite", "force_unlock", "resume_notes"}
# Arguments that fix the model a checkpoint holds: given again with another value on --resume, they
# are reported and the checkpoint's value is kept (its parameters would not fit otherwise).
# The methods' own such options are marked `fixed` where they declare them (nearl/methods/).
FIXED_ON_RESUME = ("method", "task", "model", "seed", "classes") + fixed_on_resume()


# ============================================================================= arguments
def _method(text: str) -> str:
    try:
        return canonical(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _report_to(text: str):
    try:
        return parse_report_to(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = A.Parser(prog="python -m nearl.train", description=DESCRIPTION,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    A.allow_negative_numbers(p)
    g = p.add_argument_group("model")
    g.add_argument("--method", type=_method, default="nearl", help="adaptation method: " + ", ".join(METHODS) +
                   " (default nearl; see nearl/methods/)")
    g.add_argument("--model", help="open_clip architecture, or transformers:<repo id or folder> for a transformers "
                   "CLIPModel / SiglipModel (default: ViT-B-16 with a GPU, NEARL-Tiny on CPU)")
    g.add_argument("--pretrained", help="backbone weights: open_clip tag (openai, laion2b_s34b_b88k), a "
                   "checkpoint file, hf-hub:org/repo, local-dir:path or transformers:<repo id or folder> "
                   "(default: none = random backbone)")
    g.add_argument("--fused", action="store_true", help="Triton kernels (CUDA only; falls back otherwise)")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="keep no activation inside the frozen blocks: the backward runs each again (less memory, "
                        "about one more forward of the blocks). Free to change on --resume")
    add_method_options(p)  # each method's own options, declared in its module (nearl/methods/)

    g = p.add_argument_group("data")
    g.add_argument("--task", choices=("retrieval", "classification"), default="retrieval")
    g.add_argument("--data", help="retrieval: a manifest (CSV/TSV/JSONL), ROCO folder/CSV or MedICaT JSONL; "
                   "classification: an ImageFolder dir (with train/ val/ sub-dirs, or flat) or a CoOp split "
                   ".json. Default: the embedded demo set")
    g.add_argument("--val-data", help="a separate validation source (same kinds as --data)")
    g.add_argument("--format", default="auto", help="retrieval source format: auto|manifest|roco|medicat")
    g.add_argument("--root", help="image root for a manifest or CoOp JSON (default: the file's folder)")
    g.add_argument("--k-shot", type=A.positive_int, help="classification: k training images per class")
    g.add_argument("--classes", choices=CLASS_SUBSETS, default="all", help="classification: train on the base "
                   "classes (the first half, CoOp's base-to-novel protocol), the novel ones, or all (default)")
    g.add_argument("--templates", nargs="+", help="classification prompt templates with '{}'")
    g.add_argument("--seed", type=A.seed, default=0, help="data order, augmentation, init, few-shot draw")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=A.steps, help="default 10, or as many as --max-steps needs")
    g.add_argument("--max-steps", type=A.steps, help="stop after this many optimizer steps (also the "
                   "schedule's length when it ends before --epochs). Changed on --resume, the warmup + cosine "
                   "is laid out again over the new length and the lr moves onto it linearly over max(1, warmup) "
                   "steps, so it never jumps (a finished run warms up again from its floor)")
    g.add_argument("--batch-size", type=A.positive_int, default=32, help="per process; global = this x processes")
    g.add_argument("--accum-steps", type=A.positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=A.positive_float, default=1e-3, help="peak learning rate (given again on "
                   "--resume: applies from the next step)")
    g.add_argument("--weight-decay", type=A.non_negative_float, default=0.05, help="on matrices only")
    g.add_argument("--beta1", type=A.adam_beta, default=0.9)
    g.add_argument("--beta2", type=A.adam_beta, default=0.98)
    g.add_argument("--eps", type=A.positive_float, default=1e-6)
    g.add_argument("--warmup", type=A.non_negative_int, help="warmup steps (default: 5%% of the run, at most 500)")
    g.add_argument("--min-lr-ratio", type=A.unit_interval, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--grad-clip", type=A.non_negative_float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (fp16 adds a GradScaler)")
    g.add_argument("--skip-nonfinite", type=A.non_negative_int, default=0, metavar="N",
                   help="skip up to N optimizer steps whose loss or gradients are NaN/inf (the parameters are "
                        "left as they were; each is logged with its running count); one more stops the run. "
                        "Default 0: the first one stops it, and nothing of it is saved")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/nearl", help="output directory (default %(default)s). A folder that "
                   "holds a run is refused unless --resume continues it or --overwrite replaces it")
    g.add_argument("--resume", help="a run directory (its last.pt) or checkpoint file to continue from; "
                   "arguments not given again are taken from the checkpoint, those given again take effect "
                   "(the model's shape excepted: --model, --num-queries, ... stay the checkpoint's)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one, "
                   "deleting its last.pt, last.prev.pt, best.pt, metrics.jsonl and curves.png first")
    g.add_argument("--force-unlock", action="store_true", help="take over --out's train.lock even though it "
                   "was written on another host (whether that run still lives cannot be checked from here)")
    g.add_argument("--save-every", type=A.non_negative_int, default=0, help="also checkpoint every N steps (0: per epoch)")
    g.add_argument("--eval-every", type=A.non_negative_int, default=1, help="validate every N epochs (0: only at the end)")
    g.add_argument("--eval-batch-size", type=A.positive_int, help="default: --batch-size")
    g.add_argument("--workers", type=A.non_negative_int, default=2, help="DataLoader worker processes")
    g.add_argument("--device", type=A.device, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.add_argument("--report-to", type=_report_to, action="extend", metavar="TRACKERS",
                   help="also log metrics.jsonl's scalars to tensorboard (--out/tensorboard) and/or wandb "
                        "(offline unless WANDB_MODE is set; --out/wandb): comma-separated or repeated; 'none' "
                        "turns off what a resumed run had. Needs pip install tensorboard / wandb")
    g.add_argument("--wandb-project", default="nearl-clip", help="wandb project (default %(default)s); the run "
                   "is named after the --out folder")
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


def saved_args(args) -> Dict[str, Any]:
    """The arguments a checkpoint records (what a resume restores)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "resume_notes"}
