"""Methods fitted on cached frozen features (MethodSpec.trainer "features": linear-probe): the
features are encoded once, the head is fitted full-batch, validated and checkpointed in the one
checkpoint schema. Also the features a MethodSpec.prepare fits to before any trainer runs
(Tip-Adapter's cache: prepare_on_features)."""
from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from nearl.training import distributed as D
from nearl.store.checkpoint import BEST, LAST, rng_state, save_checkpoint, training_state
from nearl.model.classify import TEMPLATES
from nearl.data.datasets import LabelledDataset
from nearl.data.overlap import training_images
from nearl.evaluation.run import encode_images, evaluate_classification, headline
from nearl.logging_utils import MetricsLog, reporter
from nearl.methods import method_of
from nearl.methods.linear_probe import fit_linear_probe
from nearl.store.nonfinite import NonFiniteError
from nearl.training.plots import plot_curves
from nearl.training.data import TrainData
from nearl.training.config import TrainConfig
from nearl.training.tracking import TrackedLog, Tracker

logger = logging.getLogger("nearl.train")
to_user = reporter("train")  # the lines the user reads (nearl.logging_utils.reporter)


def _cached_features(model, records, desc: str, kw: Dict[str, Any]):
    """(features, labels) of the records' decodable images, without augmentation."""
    ds = LabelledDataset(records, model.image_transform(False))
    kept, feats = encode_images(model, ds, desc=desc, **kw)
    return feats, ds.labels()[kept]


class _FitLog:
    """metrics.jsonl lines for each L-BFGS iteration and each weight-decay candidate; a non-finite
    loss stops the fit (L-BFGS has no step to skip)."""

    def __init__(self, log: MetricsLog, n: int):
        self.log, self.n, self.t = log, n, time.perf_counter()

    def on_step(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        self.log.write({"kind": "train", "step": step, "epoch": 0, "loss": loss,
                        "samples": self.n, "samples_per_s": self.n / dt if dt > 0 else None})
        if not math.isfinite(loss):
            raise NonFiniteError(f"linear-probe: the loss is {loss} at L-BFGS iteration {step}; the fit stopped "
                                 f"and nothing was saved. Check the features (--pretrained) and --probe-wd")

    def on_search(self, rec: Dict[str, float]) -> None:
        self.log.write({"kind": "search", "step": 0, **rec})
        to_user.info(f"linear-probe: weight decay {rec['weight_decay']:g}: val accuracy {rec['val_accuracy']:.2f}")
        self.t = time.perf_counter()


def fit_on_features(config: TrainConfig, info: D.DistInfo, model, data: TrainData, out: Path,
                    tracker: Optional[Tracker] = None) -> Dict[str, Any]:
    """linear-probe: cache the frozen image features once, fit the head full-batch (nearl/methods/
    linear_probe.py), validate and checkpoint like the main loop. A step is one L-BFGS iteration;
    --max-steps (default 100) is the budget of each candidate of the weight-decay search."""
    device = info.device
    steps = int(config.max_steps or 100)
    if config.resume:
        to_user.info("linear-probe: nothing to resume (the fit takes seconds on cached features); fitting again")
    log = TrackedLog(out / "metrics.jsonl", tracker)  # mirrored to --report-to's trackers
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # --resume of this folder: the fit starts again (claim_out allowed it)
    kw = dict(device=device, batch_size=config.eval_batch_size or config.batch_size, workers=config.workers,
              precision=config.precision, progress=not config.no_progress)
    model.eval()
    t0 = time.perf_counter()
    train_x, train_y = _cached_features(model, data.train, "train images", kw)
    val_x, val_y = _cached_features(model, data.val, "val images", kw) if data.val else (None, None)
    feature_s = time.perf_counter() - t0
    model.print_parameter_breakdown()
    to_user.info(f"task classification: {len(data.train)} training / {len(data.val)} validation records from "
                 f"{data.source}; features cached in {feature_s:.1f}s; L-BFGS, {steps} iterations per candidate "
                 f"weight decay {list(model.config.weight_decays)}")
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    n = int(train_y.numel())
    progress = _FitLog(log, n)
    chosen = fit_linear_probe(model, train_x.to(device), train_y.to(device),
                              None if val_x is None else val_x.to(device),
                              None if val_y is None else val_y.to(device), steps, seed=config.seed,
                              on_step=progress.on_step, on_search=progress.on_search)
    to_user.info(f"linear-probe: weight decay {chosen['weight_decay']:g}"
                 f"{' (chosen on validation)' if chosen['searched'] else ' (no validation data: not searched)'}")
    results, best = None, None
    if data.val:
        results = evaluate_classification(model, data.val, data.classnames,
                                          templates=config.templates or TEMPLATES, **kw)
        best = headline("classification", results, config.monitored())  # one validation: it is best.pt
        log.write({"kind": "val", "step": steps, "epoch": 1, **results, "score": best})
        to_user.info(f"validation at step {steps}: accuracy={results['accuracy']:.2f}")
        if results.get("nonfinite_rows"):
            raise NonFiniteError(f"linear-probe: {int(results['nonfinite_rows'])} validation logit rows hold NaN "
                                 "or inf: the head has diverged; nothing was saved")
    state = training_state(
        model_name=model.model_name, pretrained=config.pretrained, backbone_seed=config.seed,
        method=method_of(model), config=model.config.to_dict(), task="classification",
        classnames=data.classnames, templates=None,
        model={k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
        optimizer=None, scheduler=None, scaler=None, step=steps, epoch=1,
        batch_in_epoch=0, best=best, rng=rng_state(), data={"n": n},
        args=config.to_dict(), metrics=results or {},
        train_images=training_images(data.train, progress=not config.no_progress))
    save_checkpoint(state, out, LAST)
    if results is not None:
        save_checkpoint(state, out, BEST)
    try:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    except Exception as e:  # a plot must never kill a run
        logger.warning("could not draw curves.png: %s", e)
    to_user.info(f"done: {steps} steps; checkpoints in {out}")
    return {"step": steps, "epoch": 1, "best": best, "out": str(out), "method": method_of(model),
            "learnable_parameters": model.num_trainable_parameters(), "weight_decay": chosen["weight_decay"]}


def prepare_on_features(config: TrainConfig, info: D.DistInfo, model, data: TrainData, prepare) -> None:
    """MethodSpec.prepare (Tip-Adapter's cache model): the frozen features of the training and
    validation images, without augmentation, handed to the method before its trainer runs. Every
    rank computes the same (deterministic) features, so every rank holds the same model."""
    kw = dict(device=info.device, batch_size=config.eval_batch_size or config.batch_size, workers=config.workers,
              precision=config.precision, progress=not config.no_progress and info.is_main)
    model.eval()
    with torch.no_grad():
        train_x, train_y = _cached_features(model, data.train, "train images (cache)", kw)
        val_x, val_y = _cached_features(model, data.val, "val images (search)", kw) if data.val else (None, None)
    move = (lambda t: None if t is None else t.to(info.device))
    note = prepare(model, move(train_x), move(train_y), move(val_x), move(val_y),
                   templates=config.templates or TEMPLATES)
    if info.is_main:
        to_user.info(note)
