"""A training run from its options: hold the output folder, resolve the method and the backbone,
read the data, build the model, and hand it to its trainer (`loop.GradientRun`, or
`features.fit_on_features` for methods fitted on cached features)."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from nearl.training import config_file, distributed as D
from nearl.cli_args import check_backbone, use_fused, user_errors
from nearl.errors import UserError
from nearl.evaluation.run import check_templates, default_model_name
from nearl.methods import (DEFAULT_METHOD, build_method, canonical, check_options, check_task, method_config,
                       spec as method_spec)
from nearl.training.run_dir import RunLock, prepare as prepare_run_dir
from nearl.training.data import load_train_data, require_decodable, save_split_file
from nearl.training.features import fit_on_features, prepare_on_features
from nearl.training.loop import GradientRun, Hooks, say
from nearl.training.config import TrainConfig
from nearl.training.options import resume_dir
from nearl.training.stop import SigtermStop
from nearl.training.tracking import check_installed, open_trackers, requested
from nearl.towers.downloads import pretrained_example


def fit(config: TrainConfig, hooks: Optional[Hooks] = None) -> Dict[str, Any]:
    """Train as `python -m nearl.train` does: `fit(TrainConfig(data=..., out=..., max_steps=2))`, or
    `fit(parse_config([...]))` for a command line. Returns the run's summary (steps, best score, output
    folder, ...); a user's mistake raises UserError, and SIGTERM or a first Ctrl-C errors.Terminated,
    after saving the step it stopped at (stop.py)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"fit takes a TrainConfig (nearl.training.TrainConfig), got {type(config).__name__}; "
                        "a parsed command line converts with TrainConfig.from_namespace")
    config = dataclasses.replace(config, method_options=dict(config.method_options),
                                 resume_notes=list(config.resume_notes))  # fit fills in --model, --method
    check_templates(config.templates)  # before the folder is claimed (and --overwrite empties it)
    info = D.init(config.device)
    stop = SigtermStop(announce=info.is_main)  # the first Ctrl-C's notice: one line, not one per rank
    try:
        with stop.installed(), claim_out(config, info):
            return _run(config, info, hooks or Hooks(), stop)
    finally:
        D.cleanup(info)


@contextmanager
def claim_out(config: TrainConfig, info: D.DistInfo):
    """Hold --out for this run (nearl/training/run_dir.py): rank 0 takes the lock and checks that the folder may
    take this run; every rank learns the verdict, so none is left waiting for a rank that gave up."""
    out = Path(config.out)
    lock, error, notes = None, None, []
    if info.is_main:
        try:
            lock = RunLock(out).acquire(force=bool(config.force_unlock))
            if lock.stale:
                notes.append(lock.stale_note())
            overwrite = bool(config.overwrite)
            here = bool(config.resume) and resume_dir(config.resume).resolve() == out.resolve()
            if here and overwrite:
                raise UserError(f"--overwrite would delete the run that --resume {config.resume} continues; "
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


def _run(config: TrainConfig, info: D.DistInfo, hooks: Hooks, stop: SigtermStop) -> Dict[str, Any]:
    if config.accum_steps < 1 or config.batch_size < 1:
        raise UserError("--batch-size and --accum-steps must be >= 1")
    for line in config.resume_notes:
        say(info, line)
    method, model_name, fused = _resolve(config, info)
    trackers = requested(config.report_to)
    check_installed(trackers)  # a missing package stops here, before the data and the model
    data = load_train_data(config)
    if info.is_main:  # the held-out split lists (--val-fraction / --test-fraction) that nearl.evaluate reuses
        save_split_file(data, config.out)
    with user_errors("model settings: "):
        model = build_method(method, model_name, config.pretrained, fused=fused, seed=config.seed,
                             **method_config(method, config, data))
    model.to(info.device)
    model.set_grad_checkpointing(bool(config.grad_checkpointing))
    if method_spec(method).prepare is not None:  # Tip-Adapter: its cache from the training images' features
        require_decodable(data, data.train, config.val_data)
        prepare_on_features(config, info, model, data, method_spec(method).prepare)
    with open_trackers(trackers, config.out, main=info.is_main, config=config.to_dict(),
                       wandb_project=config.wandb_project or "nearl-clip") as tracker:
        if method_spec(method).trainer == "features":
            require_decodable(data, data.train, config.val_data)
            if info.is_main:  # what runs, as a file `--config` runs again (the gradient loop writes its own)
                config_file.write(config.to_dict(), Path(config.out))
            return fit_on_features(config, info, model, data, Path(config.out), tracker=tracker)
        return GradientRun(config, info, hooks, model, data, method=method, model_name=model_name, fused=fused,
                           tracker=tracker, stop=stop).run()


def _resolve(config: TrainConfig, info: D.DistInfo):
    """(method, backbone name, whether the fused kernels run), each checked, with what was chosen
    for the user said once."""
    fused = use_fused(config.fused, info.device, say=lambda msg: say(info, msg))
    model_name = config.model or default_model_name(config.pretrained)
    if not config.model:
        config.model = model_name
        why = ("named by --pretrained" if model_name == config.pretrained
               else "for --pretrained" if config.pretrained
               else "GPU found" if torch.cuda.is_available() else "no GPU: a CPU-sized backbone")
        say(info, f"--model not given: using {model_name} ({why})")
    if config.pretrained is None:
        say(info, f"NOTE: no --pretrained: the {model_name} backbone is RANDOM (seed {config.seed}), not CLIP. "
                  f"The run exercises the pipeline; pass --pretrained ({pretrained_example(model_name)}) for a "
                  "real model.")
    with user_errors("--method: "):
        method = canonical(config.method or DEFAULT_METHOD)
        config.method = method
        check_task(method, config.task)
    check_backbone(model_name, config.pretrained)
    check_options(method, config)
    spec = method_spec(method)
    if spec.trainer == "features" and info.distributed:
        raise UserError(f"method {method!r} fits on cached features in one process; run it without torchrun")
    if fused and not spec.fused_kernels:
        say(info, f"--fused: the Triton kernels are NEARL's; method {method} runs its PyTorch path.")
        fused = False
    return method, model_name, fused
