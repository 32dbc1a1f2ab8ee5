"""Resuming a run with settings given again (nearl.train --resume): a checkpoint holding NaN is refused,
what changed is applied and said,
the optimiser's hyper-parameters from the command line win over the checkpoint's, the schedule is
re-laid for a changed length without a jump (schedule.WarmupCosine.changed_at), and a checkpoint
that does not fit the model names the settings that differ."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from nearl.store.checkpoint import LAST, PREVIOUS, CheckpointError, load_checkpoint
from nearl.errors import UserError
from nearl.store.nonfinite import nonfinite_tensors
from nearl.training.schedule import WarmupCosine

OPTIMISER_KEYS = ("lr", "betas", "eps", "weight_decay")  # what the command line sets in each group
NOT_REPORTED = {"resume", "overwrite", "force_unlock", "workers", "no_progress"}


def changed_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'--flag old -> new' for each setting of this run (TrainConfig.to_dict()) that differs from the
    checkpoint's."""
    return [f"--{k.replace('_', '-')} {show(old)} -> {show(current[k])}" for k, old in saved.items()
            if k not in NOT_REPORTED and k in current and current[k] != old]


def check_resumable(ckpt: Dict[str, Any]) -> None:
    """A checkpoint whose learnable tensors hold NaN or inf (a diverged model, written before the
    checks or by hand) is refused before any work, naming it and the tensors: resumed, its first step
    would be NaN and the message would blame --lr. Its last.prev.pt is offered when that one is finite."""
    bad = nonfinite_tensors(ckpt["model"])
    if not bad:
        return
    path = Path(ckpt.get("path", "the checkpoint"))
    hint = "start again (--overwrite, or another --out)"
    previous = path.with_name(PREVIOUS)
    if path.name == LAST and previous.is_file():
        try:
            earlier = load_checkpoint(previous)
        except CheckpointError:
            earlier = None
        if earlier is not None and not nonfinite_tensors(earlier["model"]):
            hint = f"{previous.name} holds step {earlier.get('step')}, finite: --resume {previous}"
    raise UserError(f"{path}: {len(bad)} of {len(ckpt['model'])} learnable tensors hold NaN or inf "
                    f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): a diverged model cannot be "
                    f"resumed; {hint}")


def load_adapters(model, ckpt: Dict[str, Any], device) -> None:
    """The checkpoint's learnable parameters into `model`; a checkpoint that does not fit says which
    settings differ rather than which tensors."""
    try:
        model.load_trainable_state_dict({k: v.to(device) for k, v in ckpt["model"].items()})
    except (ValueError, RuntimeError) as e:
        theirs, ours = dict(ckpt.get("config") or {}), model.config.to_dict()
        differ = [f"{k} {theirs.get(k)!r} in the checkpoint, {ours.get(k)!r} here" for k in sorted(set(theirs) | set(ours))
                  if theirs.get(k) != ours.get(k)]
        if ckpt.get("model_name") != model.model_name:
            differ.insert(0, f"model {ckpt.get('model_name')!r} in the checkpoint, {model.model_name!r} here")
        detail = "; ".join(differ) if differ else str(e).splitlines()[0]
        raise UserError(f"{ckpt.get('path', 'the checkpoint')} does not fit the model of this run: {detail}") from None


def resume_optimizer(optimizer, scheduler, ckpt: Dict[str, Any], warmup: int, total: int,
                     min_ratio: float) -> List[str]:
    """Load the optimizer and scheduler states, then apply this run's settings: the optimiser's
    hyper-parameters from the command line (given again, or restored from the checkpoint: then equal)
    and the schedule of this run's length (WarmupCosine.changed_at if it differs). Returns what it did."""
    # This run's settings; "lr" is the peak (LambdaLR has already scaled group["lr"] by its first multiplier).
    ours = [{**{k: g[k] for k in OPTIMISER_KEYS}, "lr": g.get("initial_lr", g["lr"])} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, mine in zip(optimizer.param_groups, ours):
        group.update(mine)
        group["initial_lr"] = mine["lr"]
    scheduler.load_state_dict(ckpt["scheduler"])
    step = int(scheduler.last_epoch)  # one scheduler step per optimizer step
    saved = (ckpt["scheduler"].get("lr_lambdas") or [None])[0]
    old = WarmupCosine.from_state(saved) if saved else WarmupCosine(warmup, total, min_ratio)
    notes = []
    if old.shape() == (warmup, total, float(min_ratio)):
        schedule = old
    else:
        schedule = old.changed_at(step, warmup, total, min_ratio)
        how = (f"reached from the current multiplier {old(step):.3g} linearly over the next {schedule.ramp_steps} steps"
               if schedule.ramp_steps > 1 else "followed from the next step (warmup <= 1: no ramp)")
        notes.append(f"schedule changed from (warmup {old.warmup}, {old.total} steps, floor {old.min_ratio:g}) to "
                     f"(warmup {warmup}, {total} steps, floor {min_ratio:g}): warmup + cosine over {total} steps, {how}")
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * schedule(step)  # what LambdaLR would set: the next update uses it
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return notes


def show(value) -> str:
    if isinstance(value, list):  # --vision-layers / --text-layers: None is every block, [] none
        return ",".join(map(str, value)) or "none"
    return "all" if value is None else str(value)
