"""Train NEARL-CLIP's adapters on a frozen CLIP backbone (SPEC 3.2).

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
steps: it never jumps, and a finished run given more steps warms up again from its floor.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import argtypes as A
from . import distributed as D
from .checkpoint import (BEST, LAST, load_checkpoint, rng_state, save_checkpoint, training_state,
                         set_rng_state)
from .cli_args import check_backbone, user_errors
from .classify import TEMPLATES, ClassificationLoss, PromptClassifier, class_prompt_tokens
from .data.loadable import report_skips, require_loadable
from .evaluate import (VAL_SPLITS, autocast, default_model_name, evaluate_classification,
                       evaluate_retrieval, headline)
from .errors import UserError, run_cli
from .logging_utils import MetricsLog, format_metrics
from .methods import (METHODS, add_method_options, build_method, canonical, check_task, fixed_on_resume,
                      method_config, method_of, spec as method_spec)
from .methods.multiview import VIEW_COLUMNS
from .nonfinite import NonFiniteError, check_finite_state
from .resume import changed_settings, load_adapters, resume_optimizer, show as _show
from .run_dir import RunLock, prepare as prepare_run_dir
from .schedule import warmup_cosine

logger = logging.getLogger("nearl.train")

# Arguments a resumed run does not take from the checkpoint unless given again (one-shot actions).
NOT_RESTORED = {"resume", "overwrite", "force_unlock", "resume_notes"}
# Arguments that fix the model a checkpoint holds: given again with another value on --resume, they
# are reported and the checkpoint's value is kept (its parameters would not fit otherwise).
# The methods' own such options are marked `fixed` where they declare them (nearl/methods/).
FIXED_ON_RESUME = ("method", "task", "model", "seed") + fixed_on_resume()


# ============================================================================= arguments
def _method(text: str) -> str:
    try:
        return canonical(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = A.Parser(prog="python -m nearl.train", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    A.allow_negative_numbers(p)
    g = p.add_argument_group("model")
    g.add_argument("--method", type=_method, default="nearl", help="adaptation method: " + ", ".join(METHODS) +
                   " (default nearl; see nearl/methods/)")
    g.add_argument("--model", help="open_clip architecture (default: ViT-B-16 with a GPU, NEARL-Tiny on CPU)")
    g.add_argument("--pretrained", help="backbone weights: open_clip tag (openai, laion2b_s34b_b88k), a "
                   "checkpoint file, hf-hub:org/repo or local-dir:path (default: none = random backbone)")
    g.add_argument("--fused", action="store_true", help="Triton kernels (CUDA only; falls back otherwise)")
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
    g.add_argument("--templates", nargs="+", help="classification prompt templates with '{}'")
    g.add_argument("--seed", type=A.non_negative_int, default=0, help="data order, augmentation, init, few-shot draw")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=A.positive_int, help="default 10, or as many as --max-steps needs")
    g.add_argument("--max-steps", type=A.positive_int, help="stop after this many optimizer steps (also the "
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
    return p


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests given on the command line (parse again with every default suppressed)."""
    shadow = A.allow_negative_numbers(argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS))
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kw = {"dest": action.dest}
            if isinstance(action, argparse._StoreTrueAction):
                shadow.add_argument(*action.option_strings, action="store_true", **kw)
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


# ============================================================================= data
class SeededAugment(Dataset):
    """Makes random augmentation a function of (seed, epoch, index): each item is produced under
    torch / python generators seeded from those three numbers, whatever the worker or the order.
    A resumed run (or another world size) then sees exactly the same tensors."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        s = D.mix_seed(self.seed, self.epoch, i)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                return self.base[i]
        finally:
            random.setstate(py_state)


@dataclass
class TrainData:
    task: str
    train: list
    val: list
    classnames: Optional[List[str]]
    source: str


def _read_retrieval(path: str, fmt: str, root: Optional[str]):
    from .data.manifests import read_image_text
    return read_image_text(path, format=fmt, **({"root": root} if root else {}))


def _read_labelled(path: Path, root: Optional[str]):
    """({split: records}, classnames) from a CoOp JSON or an ImageFolder (split sub-dirs or flat)."""
    from .data.labelled import read_coop_split, read_image_folder
    if path.suffix.lower() == ".json":
        return read_coop_split(path, root=Path(root) if root else path.parent)
    if not path.is_dir():
        raise UserError(f"classification data must be an ImageFolder directory or a CoOp split .json, got {path}")
    split_dirs = {s: path / s for s in ("train", "val", "validation", "test") if (path / s).is_dir()}
    if "train" not in split_dirs:
        records, classnames = read_image_folder(path)
        return {"train": records}, classnames
    splits, classnames = {}, None
    for s, d in split_dirs.items():
        records, names = read_image_folder(d)
        if classnames is not None and names != classnames:
            raise UserError(f"{d}: classes {names} differ from train's {classnames}")
        classnames = names
        splits["val" if s == "validation" else s] = records
    return splits, classnames


def _view_columns(args) -> List[str]:
    cols = [c.strip() for c in str(getattr(args, "view_columns", None) or ",".join(VIEW_COLUMNS)).split(",")]
    if len(cols) != len(VIEW_COLUMNS) or not all(cols):
        raise UserError(f"--view-columns needs {len(VIEW_COLUMNS)} comma-separated names, got {cols}")
    return cols


def load_train_data(args) -> TrainData:
    from .data import demo
    if args.task == "retrieval":
        if args.k_shot:
            raise UserError("--k-shot applies to --task classification only")
        path = args.data or str(demo.demo_manifest())
        if getattr(args, "multiview", False):
            if args.format not in ("auto", "manifest"):
                raise UserError(f"--multiview reads a manifest (CSV/TSV/JSONL), not --format {args.format}")
            from .methods.multiview import read_multiview
            records = read_multiview(path, root=args.root, columns=_view_columns(args))
        else:
            records = _read_retrieval(path, args.format, args.root)
        train = [r for r in records if r.split in (None, "train")]
        if args.val_data:
            val = _read_retrieval(args.val_data, args.format, None)
        else:
            val = [r for r in records if r.split in VAL_SPLITS]
        if not train:
            raise UserError(f"{path}: no training records (split 'train' or no split column)")
        return TrainData("retrieval", train, val, None, path)
    path = Path(args.data) if args.data else demo.demo_split_json()
    splits, classnames = _read_labelled(path, args.root)
    train = splits.get("train", [])
    if args.val_data:
        vs, vnames = _read_labelled(Path(args.val_data), None)
        if vnames != classnames:
            raise UserError(f"--val-data classes {vnames} differ from the training classes {classnames}")
        val = vs.get("val") or vs.get("test") or vs.get("train", [])
    else:
        val = splits.get("val", [])
    if not train:
        raise UserError(f"{path}: no training records")
    if args.k_shot:
        from .data.labelled import k_shot
        train = k_shot(train, args.k_shot, args.seed)
    return TrainData("classification", train, val, classnames, str(path))


def make_dataset(data: TrainData, model, seed: int, multiview: bool = False) -> Dataset:
    from .data.datasets import ImageTextDataset, LabelledDataset
    transform = model.image_transform(True)
    if multiview:
        from .methods.multiview import MultiViewDataset
        base = MultiViewDataset(data.train, transform, model.tokenizer(), train=True, seed=seed,
                                num_views=model.num_views)
    elif data.task == "retrieval":
        base = ImageTextDataset(data.train, transform, model.tokenizer(), train=True, seed=seed)
    else:
        base = LabelledDataset(data.train, transform)
    return SeededAugment(base, seed)


# ============================================================================= pieces of the loop
def param_groups(model, weight_decay: float):
    """AdamW groups: decay on weight matrices; none on gates, LayerNorms, biases and the query bank.
    A method may say otherwise with `model.decays(name, p)` (e.g. ALTA: its adapter matrices only)."""
    decay, no_decay = [], []
    rule = getattr(model, "decays", None)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = rule(name, p) if rule is not None else (p.ndim >= 2 and not name.startswith("queries."))
        (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def unused_parameters(module, model, loss_fn, task: str, device, image_size: int, tokenizer) -> List[str]:
    """Names of learnable parameters that get no gradient from one probe step (zeros in, world 1).

    DDP must be told about those (find_unused_parameters=True) or it waits for their gradients
    forever; with every parameter used (the default config) it is left off, which saves a graph
    traversal per step. Runs before training, touches no generator, leaves no gradients behind.
    """
    images = torch.zeros(2, 3, image_size, image_size, device=device)
    if task == "retrieval":
        terms = loss_fn(module(images, tokenizer(["a", "b"]).to(device)))
    else:
        terms = loss_fn(module(images), torch.zeros(2, dtype=torch.long, device=device))
    terms["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for p in model.parameters():
        p.grad = None
    return unused


def _sync_grads(params, info: D.DistInfo) -> None:
    """Average gradients by hand (an accumulation group whose last micro-batch was empty)."""
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= info.world_size


def _image_size(model) -> int:
    return int(model.tower("vision").image_size[0])


class Hooks:
    """Callbacks for tests and tools: on_step(step, record) after each optimizer step (and after
    that step's checkpoint, if any)."""

    def on_step(self, step: int, record: Dict[str, Any]) -> None:
        pass


# ============================================================================= main loop
def train(args: argparse.Namespace, hooks: Optional[Hooks] = None) -> Dict[str, Any]:
    info = D.init(args.device)
    try:
        with claim_out(args, info):
            return _train(args, info, hooks or Hooks())
    finally:
        D.cleanup(info)


@contextmanager
def claim_out(args, info: D.DistInfo):
    """Hold --out for this run (nearl/run_dir.py): rank 0 takes the lock and checks that the folder may
    take this run; every rank learns the verdict, so none is left waiting for a rank that gave up."""
    out = Path(args.out)
    lock, error, notes = None, None, []
    if info.is_main:
        try:
            lock = RunLock(out).acquire(force=bool(getattr(args, "force_unlock", False)))
            if lock.stale:
                notes.append(f"found a stale {lock.path.name} of a run that ended without removing it "
                             f"(pid {lock.stale.get('pid', '?')} on host {lock.stale.get('host', '?')}): taken over")
            overwrite = bool(getattr(args, "overwrite", False))
            here = bool(args.resume) and resume_dir(args.resume).resolve() == out.resolve()
            if here and overwrite:
                raise UserError(f"--overwrite would delete the run that --resume {args.resume} continues; "
                                "give one of them")
            notes += prepare_run_dir(out, resuming_here=here, overwrite=overwrite)
        except UserError as e:
            if lock is not None:
                lock.release()
            error = e
    verdict = D.broadcast_object(None if error is None else str(error), info)
    if error is not None:
        raise error
    if verdict is not None:
        raise UserError(verdict)
    for line in notes:
        _say(info, line)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _say(info: D.DistInfo, *msg) -> None:
    if info.is_main:
        print(*msg, flush=True)


def _train(args, info: D.DistInfo, hooks: Hooks) -> Dict[str, Any]:
    main_rank = info.is_main
    device = info.device
    out = Path(args.out)
    if args.accum_steps < 1 or args.batch_size < 1:
        raise UserError("--batch-size and --accum-steps must be >= 1")
    for line in getattr(args, "resume_notes", None) or []:
        _say(info, line)

    # ---------------------------------------------------------------- model
    fused = bool(args.fused)
    if fused and device.type != "cuda":
        _say(info, "--fused: the Triton kernels need a CUDA GPU; none here, so the reference PyTorch path runs.")
        fused = False
    model_name = args.model or default_model_name(args.pretrained)
    if not args.model:
        args.model = model_name
        why = ("named by --pretrained" if model_name == args.pretrained else "for --pretrained" if args.pretrained
               else "GPU found" if torch.cuda.is_available() else "no GPU: a CPU-sized backbone")
        _say(info, f"--model not given: using {model_name} ({why})")
    if args.pretrained is None:
        _say(info, f"NOTE: no --pretrained: the {model_name} backbone is RANDOM (seed {args.seed}), not CLIP. "
                   "The run exercises the pipeline; pass --pretrained (e.g. openai) for a real model.")
    with user_errors("--method: "):
        method = canonical(getattr(args, "method", None) or "nearl")
    args.method = method
    with user_errors("--method: "):
        check_task(method, args.task)
    check_backbone(model_name, args.pretrained)
    if getattr(args, "multiview", False) and (method != "alta" or args.task != "retrieval"):
        raise UserError(f"--multiview is an option of method 'alta' with task 'retrieval' "
                         f"(got method {method!r}, task {args.task!r})")
    spec = method_spec(method)
    if spec.trainer == "features" and info.distributed:
        raise UserError(f"method {method!r} fits on cached features in one process; run it without torchrun")
    if fused and not spec.fused_kernels:
        _say(info, f"--fused: the Triton kernels are NEARL's; method {method} runs its PyTorch path.")
        fused = False

    # ---------------------------------------------------------------- data
    data = load_train_data(args)
    config = method_config(method, args, data)
    with user_errors("model settings: "):
        model = build_method(method, model_name, args.pretrained, fused=fused, seed=args.seed, **config)
    model.to(device)
    cfg = model.config
    tokenizer = model.tokenizer()
    if spec.trainer == "features":
        require_loadable(data.train, data.source)
        return _train_linear_probe(args, info, model, data, out)
    dataset = make_dataset(data, model, args.seed, multiview=getattr(args, "multiview", False))
    require_loadable(dataset, data.source)  # a set with no decodable image stops here, naming files
    per_rank = args.batch_size
    if len(dataset) < per_rank * info.world_size:
        new = max(1, len(dataset) // info.world_size)
        _say(info, f"warning: {len(dataset)} training samples < global batch {per_rank * info.world_size}; "
                   f"using --batch-size {new} per process")
        per_rank = new
    sampler = D.ShardedBatchSampler(len(dataset), per_rank, rank=info.rank, world_size=info.world_size,
                                    seed=args.seed, shuffle=True, drop_last=True)
    from .data.datasets import collate_skip_bad
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate_skip_bad,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    micro_per_epoch = sampler.batches_per_epoch()
    steps_per_epoch = micro_per_epoch // args.accum_steps
    if steps_per_epoch < 1:
        raise UserError(f"{len(dataset)} samples make {micro_per_epoch} batches of {per_rank} x "
                         f"{info.world_size} processes: fewer than --accum-steps {args.accum_steps}")
    epochs = args.epochs or (math.ceil(args.max_steps / steps_per_epoch) if args.max_steps else 10)
    total = epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = args.warmup if args.warmup is not None else min(500, math.ceil(0.05 * total))

    # ---------------------------------------------------------------- objective
    if data.task == "retrieval":
        from .losses import NEARLLoss
        module = model
        loss_fn = NEARLLoss.from_config(cfg, rank=info.rank, world_size=info.world_size)
        probe_loss = NEARLLoss.from_config(cfg)
    else:
        templates = args.templates or list(TEMPLATES)
        prompts = class_prompt_tokens(model, data.classnames, templates).to(device)
        module = PromptClassifier(model, prompts, len(data.classnames)).to(device)
        loss_fn = ClassificationLoss.from_config(cfg, rank=info.rank, world_size=info.world_size)
        probe_loss = ClassificationLoss.from_config(cfg)
    params = list(model.trainable_parameters())
    if not params:  # zeroshot: nothing to learn; validate once and record a checkpoint naming the method
        _say(info, f"method {method}: no learnable parameters; nothing is trained (validation and a checkpoint only)")
        total = epochs = 0
    if info.distributed and params:
        unused = unused_parameters(module, model, probe_loss, data.task, device, _image_size(model), tokenizer)
        if unused:
            _say(info, f"DDP: {len(unused)} learnable tensors get no gradient with this config "
                       f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): find_unused_parameters=True")
        else:
            _say(info, "DDP: every learnable tensor gets a gradient: find_unused_parameters=False")
        ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(unused), broadcast_buffers=False)
        forward = ddp
    else:
        ddp, forward = None, module

    if params:
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                      betas=(args.beta1, args.beta2), eps=args.eps)
        scheduler = warmup_cosine(optimizer, warmup, total, args.min_lr_ratio)
    else:
        optimizer = scheduler = None
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" and params else None

    # ---------------------------------------------------------------- state / resume
    step, epoch, pos, best, skipped = 0, 0, 0, None, 0
    log = MetricsLog(out / "metrics.jsonl", enabled=main_rank)
    if args.resume:
        ckpt = load_checkpoint(args.resume, map_location="cpu")
        if ckpt.get("task", "retrieval") != data.task:
            raise UserError(f"checkpoint task {ckpt.get('task')} != --task {data.task}")
        if canonical(ckpt.get("method") or "nearl") != method:
            raise UserError(f"checkpoint method {ckpt.get('method')} != --method {method}")
        load_adapters(model, ckpt, device)
        changed = changed_settings(ckpt.get("args", {}), args)
        if changed:
            _say(info, "resume: settings given again take effect: " + ", ".join(changed))
        if optimizer is not None:
            for line in resume_optimizer(optimizer, scheduler, ckpt, warmup, total, args.min_lr_ratio):
                _say(info, "resume: " + line)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, pos, best = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt.get("best")
        skipped = int(ckpt.get("nonfinite_skipped", 0))
        saved = ckpt.get("data", {})
        if saved and (saved.get("n"), saved.get("batch_size"), saved.get("world_size")) != (
                sampler.n, sampler.batch_size, sampler.world_size):
            _say(info, f"warning: data layout changed since the checkpoint ({saved}); the data order "
                       "will not match an uninterrupted run")
        set_rng_state(ckpt["rng"])
        log.truncate_after(step)
        _say(info, f"resumed from {ckpt['path']}: step {step}, epoch {epoch}, batch {pos} of the epoch")
    else:
        random.seed(args.seed)
        np.random.seed(args.seed % 2**32)
        torch.manual_seed(args.seed)

    if main_rank:
        model.print_parameter_breakdown()
        if method != "nearl":
            print(f"method {method}: {model.num_trainable_parameters():,} learnable parameters")
        print(f"task {data.task}: {len(data.train)} training / {len(data.val)} validation records from {data.source}")
        print(f"{info.world_size} process(es) x batch {per_rank} x accumulation {args.accum_steps} = "
              f"{per_rank * info.world_size * args.accum_steps} samples per step; {steps_per_epoch} steps per "
              f"epoch; {total} steps ({epochs} epochs at most), warmup {warmup}; device {device}, "
              f"precision {args.precision}{', fused kernels' if fused else ''}", flush=True)
    if not data.val:
        _say(info, "no validation records: no per-epoch evaluation and no best.pt "
                   "(give the manifest a 'val' split or use --val-data)")

    def state(tag_epoch: int, tag_pos: int, metrics: Optional[dict] = None) -> Dict[str, Any]:
        return training_state(
            model_name=model_name, pretrained=args.pretrained, backbone_seed=args.seed,
            method=method, config=cfg.to_dict(), task=data.task, classnames=data.classnames,
            templates=(args.templates or list(TEMPLATES)) if data.task == "classification" else None,
            model={k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            scaler=scaler.state_dict() if scaler is not None else None,
            step=step, epoch=tag_epoch, batch_in_epoch=tag_pos, best=best,
            rng=rng_state(), data={**sampler.state_dict(), "epoch": tag_epoch, "start": tag_pos},
            args=saved_args(args), metrics=metrics or {})

    saved_at = {"step": None, "best": None}
    last_good = step if args.resume and (out / LAST).exists() else None  # what out/last.pt holds

    def kept() -> str:
        """Where the last good checkpoint is, for the message that stops a diverged run."""
        if last_good is None:
            return "No checkpoint was written"
        return f"Nothing after step {last_good} was saved: {out / LAST} holds step {last_good}"

    def save(name: str, tag_epoch: int, tag_pos: int, metrics: Optional[dict] = None) -> None:
        nonlocal last_good
        # Every rank holds the same parameters, so every rank reaches the same verdict.
        check_finite_state(model.trainable_state_dict(), f"step {step}: {out / name}")
        D.barrier(info)
        if main_rank:
            save_checkpoint({**state(tag_epoch, tag_pos, metrics), "nonfinite_skipped": skipped}, out, name)
        if name == LAST:
            saved_at.update(step=step, best=best)
            last_good = step
        D.barrier(info)

    last_eval_step = -1

    def validate() -> Optional[Dict[str, float]]:
        nonlocal best, last_eval_step
        if not data.val or last_eval_step == step:
            return None
        last_eval_step = step
        results, broken = None, None
        if main_rank:
            kw = dict(device=device, batch_size=args.eval_batch_size or per_rank, workers=args.workers,
                      precision=args.precision, progress=not args.no_progress,
                      source=getattr(args, "val_data", None) or data.source)
            if data.task == "retrieval":
                results = evaluate_retrieval(model, data.val, **kw)
            else:
                results = evaluate_classification(model, data.val, data.classnames,
                                                  templates=args.templates or TEMPLATES, **kw)
            score = headline(data.task, results)
            log.write({"kind": "val", "step": step, "epoch": epoch, **results, "score": score})
            shown = {k: v for k, v in results.items() if k in ("mean_recall", "i2t_R@1", "t2i_R@1", "accuracy",
                                                              "macro_f1", "macro_auc")}
            print(f"validation at step {step}: {format_metrics(shown)}", flush=True)
            bad = int(results.get("nonfinite_rows", 0))
            if bad:  # the metrics counted them as misses; the model itself is broken
                broken = (f"validation at step {step}: the model's outputs hold NaN or inf for {bad} inputs: "
                          f"it has diverged, so training stopped and it was not saved. {kept()}. Lower --lr "
                          f"(now {args.lr:g}) and resume from that checkpoint, or start again")
            elif math.isfinite(score) and (best is None or score > best):
                best = score
                save_checkpoint({**state(epoch, pos, results), "nonfinite_skipped": skipped}, out, BEST)
                print(f"new best {score:.2f}: {out / BEST}", flush=True)
        best, broken = D.broadcast_object((best, broken), info)  # every rank takes the same decisions
        if broken:
            raise NonFiniteError(broken)
        return results

    def plot() -> None:
        if main_rank:
            try:
                from .plots import plot_curves
                plot_curves(out / "metrics.jsonl", out / "curves.png")
            except Exception as e:  # a plot must never kill a run
                logger.warning("could not draw curves.png: %s", e)

    # ---------------------------------------------------------------- loop
    module.train()
    accum = args.accum_steps
    amp = autocast(device, args.precision)
    progress = not args.no_progress and main_rank
    while step < total and epoch < epochs:
        sampler.set_epoch(epoch, start=pos)
        dataset.set_epoch(epoch)
        bar = tqdm(total=steps_per_epoch, initial=pos // accum, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, dynamic_ncols=True)
        group: List[Dict[str, float]] = []
        micro, seen, t0 = 0, 0, time.perf_counter()
        for batch in loader:
            if pos >= steps_per_epoch * accum:
                break
            pos += 1
            micro += 1
            n_local = 0 if batch is None else int(batch[0].shape[0])
            n = D.all_reduce_min(n_local, info)  # equal sizes on every rank (gathered loss)
            last_micro = micro == accum
            if n > 0:
                # (images, tokens | labels), or (views, view_mask, tokens) with --multiview
                images, second = batch[0][:n].to(device, non_blocking=True), batch[-1][:n].to(device, non_blocking=True)
                extra = tuple(t[:n].to(device, non_blocking=True) for t in batch[1:-1])
                sync = ddp.no_sync() if (ddp is not None and not last_micro) else nullcontext()
                with sync:
                    with amp:
                        if data.task == "retrieval":
                            terms = loss_fn(forward(images, second, *extra))
                        else:
                            terms = loss_fn(forward(images), second)
                    loss = terms["loss"] / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                group.append({k: float(v.detach()) for k, v in terms.items()})
                seen += n * info.world_size
            elif ddp is not None and last_micro and group:
                _sync_grads(params, info)  # the synced backward of this group never happened
            if not last_micro:
                continue

            # ---- optimizer step, unless the loss or the gradients are not finite
            if scaler is not None:
                scaler.unscale_(optimizer)
            clip = args.grad_clip if args.grad_clip and args.grad_clip > 0 else math.inf  # inf: the norm only
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            keys = sorted({k for g in group for k in g})
            mean = {k: sum(g[k] for g in group if k in g) / max(1, sum(k in g for g in group)) for k in keys}
            # One collective gives every rank the mean losses and whether any rank's gradients were
            # non-finite, so all ranks take the same decision below (none waits for another).
            reduced = D.all_reduce_mean(torch.tensor([float(not math.isfinite(grad_norm))] + [mean[k] for k in keys],
                                                     dtype=torch.float64), info).tolist()
            bad_grad, mean = reduced[0] > 0, dict(zip(keys, reduced[1:]))
            bad_loss = not all(math.isfinite(v) for v in mean.values())
            # With fp16, inf gradients are the GradScaler's to handle: it skips the step and lowers the scale.
            nonfinite = bad_loss or (bad_grad and scaler is None)
            lr = optimizer.param_groups[0]["lr"]
            if nonfinite:  # the parameters and the optimizer's moments stay as they were
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            micro = 0
            dt = time.perf_counter() - t0
            record = {"kind": "train", "step": step, "epoch": epoch, "lr": lr, **mean,
                      "samples": seen, "samples_per_s": seen / dt if dt > 0 else None, "grad_norm": grad_norm}
            if scaler is not None:
                record["loss_scale"] = float(scaler.get_scale())
            if nonfinite:
                record["nonfinite_skipped"] = skipped
            log.write(record)
            if nonfinite and skipped > args.skip_nonfinite:
                what = f"loss is {mean.get('loss')}" if bad_loss else f"gradient norm is {grad_norm}"
                earlier = (f" after {skipped - 1} such step(s) skipped (--skip-nonfinite {args.skip_nonfinite})"
                           if args.skip_nonfinite else "")
                raise NonFiniteError(f"step {step}: the {what}{earlier}; training stopped without applying it. "
                                     f"{kept()}. Lower --lr (now {args.lr:g}), check the data, or pass "
                                     f"--skip-nonfinite N to skip up to N such steps")
            if nonfinite:
                _say(info, f"step {step}: non-finite {'loss' if bad_loss else 'gradients'}: step skipped "
                           f"({skipped} of at most {args.skip_nonfinite})")
            bar.update(1)
            bar.set_postfix(loss=f"{mean.get('loss', float('nan')):.4f}",
                            samples_s=f"{record['samples_per_s'] or 0:.1f}", lr=f"{lr:.2e}")
            group, seen, t0 = [], 0, time.perf_counter()
            at_epoch_end = pos >= steps_per_epoch * accum
            if args.save_every and step % args.save_every == 0 and not at_epoch_end and step < total:
                save(LAST, epoch, pos)
            hooks.on_step(step, record)
            if step >= total:
                break
        bar.close()
        report_skips(dataset, log, step=step, source=data.source)  # once per data set, not per epoch
        if pos >= steps_per_epoch * accum:  # a full epoch
            epoch, pos = epoch + 1, 0
            if args.eval_every and epoch % args.eval_every == 0 and validate() is not None:
                plot()  # the curves are redrawn with each validation, and at the end
            save(LAST, epoch, pos)

    # ---------------------------------------------------------------- the end
    final = validate()
    if saved_at != {"step": step, "best": best}:
        save(LAST, epoch, pos, final)
    plot()
    if main_rank:
        print(f"done: {step} steps{f' ({skipped} skipped as non-finite)' if skipped else ''}; checkpoints in "
              f"{out} ({LAST}{', ' + BEST if (out / BEST).exists() else ''}), "
              f"metrics in {out / 'metrics.jsonl'}, curves in {out / 'curves.png'}", flush=True)
    log.close()
    return {"step": step, "epoch": epoch, "best": best, "out": str(out), "method": method,
            "learnable_parameters": model.num_trainable_parameters(), "nonfinite_skipped": skipped}


def _train_linear_probe(args, info: D.DistInfo, model, data: TrainData, out: Path) -> Dict[str, Any]:
    """linear-probe: cache the frozen image features once, fit the head full-batch (nearl/methods/
    linear_probe.py), validate and checkpoint like the main loop. A step is one L-BFGS iteration;
    --max-steps (default 100) is the budget of each candidate of the weight-decay search."""
    from .data.datasets import LabelledDataset
    from .evaluate import encode_images
    from .methods.linear_probe import fit_linear_probe

    device = info.device
    steps = int(args.max_steps or 100)
    if args.resume:
        print("linear-probe: nothing to resume (the fit takes seconds on cached features); fitting again")
    log = MetricsLog(out / "metrics.jsonl")
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # --resume of this folder: the fit starts again (claim_out allowed it)
    kw = dict(device=device, batch_size=args.eval_batch_size or args.batch_size, workers=args.workers,
              precision=args.precision, progress=not args.no_progress)
    transform = model.image_transform(False)  # cached features: no augmentation

    def cache(records, desc):
        ds = LabelledDataset(records, transform)
        kept, feats = encode_images(model, ds, desc=desc, **kw)
        return feats, ds.labels()[kept]

    model.eval()
    t0 = time.perf_counter()
    train_x, train_y = cache(data.train, "train images")
    val_x, val_y = cache(data.val, "val images") if data.val else (None, None)
    feature_s = time.perf_counter() - t0
    model.print_parameter_breakdown()
    print(f"task classification: {len(data.train)} training / {len(data.val)} validation records from "
          f"{data.source}; features cached in {feature_s:.1f}s; L-BFGS, {steps} iterations per candidate "
          f"weight decay {list(model.config.weight_decays)}", flush=True)
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    n = int(train_y.numel())
    last = {"t": time.perf_counter()}

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        dt, last["t"] = now - last["t"], now
        log.write({"kind": "train", "step": step, "epoch": 0, "loss": loss,
                   "samples": n, "samples_per_s": n / dt if dt > 0 else None})
        if not math.isfinite(loss):  # L-BFGS has no step to skip: the fit has diverged
            raise NonFiniteError(f"linear-probe: the loss is {loss} at L-BFGS iteration {step}; the fit stopped "
                                 f"and nothing was saved. Check the features (--pretrained) and --probe-wd")

    def on_search(rec: Dict[str, float]) -> None:
        log.write({"kind": "search", "step": 0, **rec})
        print(f"linear-probe: weight decay {rec['weight_decay']:g}: val accuracy {rec['val_accuracy']:.2f}", flush=True)
        last["t"] = time.perf_counter()

    chosen = fit_linear_probe(model, train_x.to(device), train_y.to(device),
                              None if val_x is None else val_x.to(device),
                              None if val_y is None else val_y.to(device), steps, seed=args.seed,
                              on_step=on_step, on_search=on_search)
    print(f"linear-probe: weight decay {chosen['weight_decay']:g}"
          f"{' (chosen on validation)' if chosen['searched'] else ' (no validation data: not searched)'}", flush=True)
    results, best = None, None
    if data.val:
        results = evaluate_classification(model, data.val, data.classnames,
                                          templates=args.templates or TEMPLATES, **kw)
        best = headline("classification", results)
        log.write({"kind": "val", "step": steps, "epoch": 1, **results, "score": best})
        print(f"validation at step {steps}: accuracy={results['accuracy']:.2f}", flush=True)
        if results.get("nonfinite_rows"):
            raise NonFiniteError(f"linear-probe: {int(results['nonfinite_rows'])} validation logit rows hold NaN "
                                 "or inf: the head has diverged; nothing was saved")
    state = training_state(
        model_name=model.model_name, pretrained=args.pretrained, backbone_seed=args.seed,
        method=method_of(model), config=model.config.to_dict(), task="classification",
        classnames=data.classnames, templates=None,
        model={k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        optimizer=None, scheduler=None, scaler=None, step=steps, epoch=1,
        batch_in_epoch=0, best=best, rng=rng_state(), data={"n": n},
        args=saved_args(args), metrics=results or {})
    save_checkpoint(state, out, LAST)
    if results is not None:
        save_checkpoint(state, out, BEST)
    try:
        from .plots import plot_curves
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    except Exception as e:  # a plot must never kill a run
        logger.warning("could not draw curves.png: %s", e)
    print(f"done: {steps} steps; checkpoints in {out}", flush=True)
    return {"step": steps, "epoch": 1, "best": best, "out": str(out), "method": method_of(model),
            "learnable_parameters": model.num_trainable_parameters(), "weight_decay": chosen["weight_decay"]}


def setup_logging() -> None:
    """nearl's own INFO lines (reader summaries) on rank 0; other libraries at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.getLogger("nearl").setLevel(logging.INFO if main_rank else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train from a command line; user mistakes raise UserError (see `cli` for the one-line report)."""
    setup_logging()
    return train(parse_args(argv))


def cli() -> None:
    """The `nearl-train` console script: a user error is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, prog="nearl.train"))


if __name__ == "__main__":
    cli()
