"""A training run from its options: hold the output folder, resolve the method and the backbone,
read the data, build the model, and hand it to its trainer (`loop.GradientRun`, or
`features.fit_on_features` for methods fitted on cached features)."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import distributed as D
from ..cli_args import check_backbone, user_errors
from ..errors import UserError
from ..evaluation import check_templates, default_model_name
from ..methods import build_method, canonical, check_options, check_task, method_config, spec as method_spec
from ..run_dir import RunLock, prepare as prepare_run_dir
from .data import load_train_data, require_decodable
from .features import fit_on_features
from .loop import GradientRun, Hooks, say
from .options import resume_dir, saved_args
from .stop import SigtermStop
from .tracking import check_installed, open_trackers, requested


def fit(args: argparse.Namespace, hooks: Optional[Hooks] = None) -> Dict[str, Any]:
    """Train as `python -m nearl.train` does; `args` from `nearl.training.parse_args([...])`. Returns
    the run's summary (steps, best score, output folder, ...); a user's mistake raises UserError, and
    SIGTERM errors.Terminated, after saving the step it stopped at (stop.py)."""
    check_templates(getattr(args, "templates", None))  # before the folder is claimed (and --overwrite empties it)
    info = D.init(args.device)
    stop = SigtermStop()
    try:
        with stop.installed(), claim_out(args, info):
            return _run(args, info, hooks or Hooks(), stop)
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
                notes.append(lock.stale_note())
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
        say(info, line)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run(args, info: D.DistInfo, hooks: Hooks, stop: SigtermStop) -> Dict[str, Any]:
    if args.accum_steps < 1 or args.batch_size < 1:
        raise UserError("--batch-size and --accum-steps must be >= 1")
    for line in getattr(args, "resume_notes", None) or []:
        say(info, line)
    method, model_name, fused = _resolve(args, info)
    trackers = requested(getattr(args, "report_to", None))
    check_installed(trackers)  # a missing package stops here, before the data and the model
    data = load_train_data(args)
    with user_errors("model settings: "):
        model = build_method(method, model_name, args.pretrained, fused=fused, seed=args.seed,
                             **method_config(method, args, data))
    model.to(info.device)
    model.set_grad_checkpointing(bool(getattr(args, "grad_checkpointing", False)))
    with open_trackers(trackers, args.out, main=info.is_main, config=saved_args(args),
                       wandb_project=getattr(args, "wandb_project", None) or "nearl-clip") as tracker:
        if method_spec(method).trainer == "features":
            require_decodable(data, data.train, getattr(args, "val_data", None))
            return fit_on_features(args, info, model, data, Path(args.out), tracker=tracker)
        return GradientRun(args, info, hooks, model, data, method=method, model_name=model_name, fused=fused,
                           tracker=tracker, stop=stop).run()


def _resolve(args, info: D.DistInfo):
    """(method, backbone name, whether the fused kernels run), each checked, with what was chosen
    for the user said once."""
    fused = bool(args.fused)
    if fused and info.device.type != "cuda":
        say(info, "--fused: the Triton kernels need a CUDA GPU; none here, so the reference PyTorch path runs.")
        fused = False
    model_name = args.model or default_model_name(args.pretrained)
    if not args.model:
        args.model = model_name
        why = ("named by --pretrained" if model_name == args.pretrained else "for --pretrained" if args.pretrained
               else "GPU found" if torch.cuda.is_available() else "no GPU: a CPU-sized backbone")
        say(info, f"--model not given: using {model_name} ({why})")
    if args.pretrained is None:
        example = model_name if model_name.startswith("transformers:") else "openai"
        say(info, f"NOTE: no --pretrained: the {model_name} backbone is RANDOM (seed {args.seed}), not CLIP. "
                  f"The run exercises the pipeline; pass --pretrained (e.g. {example}) for a real model.")
    with user_errors("--method: "):
        method = canonical(getattr(args, "method", None) or "nearl")
        args.method = method
        check_task(method, args.task)
    check_backbone(model_name, args.pretrained)
    check_options(method, args)
    spec = method_spec(method)
    if spec.trainer == "features" and info.distributed:
        raise UserError(f"method {method!r} fits on cached features in one process; run it without torchrun")
    if fused and not spec.fused_kernels:
        say(info, f"--fused: the Triton kernels are NEARL's; method {method} runs its PyTorch path.")
        fused = False
    return method, model_name, fused
