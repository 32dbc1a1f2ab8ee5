"""The gradient training loop every method but the feature-fitted ones shares (`GradientRun`):
data loader and schedule, objective (with DDP), optimizer, resume, the optimizer step with its
non-finite guard, validation, checkpoints and curves."""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nearl.training import config_file, distributed as D
from nearl.store.checkpoint import BEST, LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state, training_state
from nearl.model.classify import TEMPLATES, ClassificationLoss, PromptClassifier, class_prompt_tokens
from nearl.data.datasets import collate_skip_bad
from nearl.data.loadable import report_skips
from nearl.data.overlap import training_images
from nearl.errors import UserError
from nearl.evaluation.run import autocast, evaluate_classification, evaluate_retrieval, headline
from nearl.evaluation.multilabel import evaluate_multilabel
from nearl.model.multilabel import objective as multilabel_objective
from nearl.logging_utils import format_metrics, reporter
from nearl.model.losses import NEARLLoss
from nearl.methods import DEFAULT_METHOD, canonical, spec
from nearl.evaluation.metric_table import MAIN_METRIC, VALIDATION_SHOWN, better
from nearl.store.nonfinite import NonFiniteError, check_finite_state
from nearl.training.plots import plot_curves
from nearl.training.resume import changed_settings, load_adapters, resume_optimizer
from nearl.training.schedule import warmup_cosine
from nearl.training.data import TrainData, make_dataset, require_decodable
from nearl.training.config import TrainConfig
from nearl.training.stop import SigtermStop
from nearl.training.tracking import TrackedLog, Tracker

logger = logging.getLogger("nearl.train")
to_user = reporter("train")  # the lines the user reads (nearl.logging_utils.reporter)
AUTO_VALIDATIONS = 20  # about how often a run of many short epochs validates without --eval-every


def param_groups(model, weight_decay: float):
    """AdamW groups: decay on the learnable tensors the model's `decays(name, p)` names (NEARL-CLIP:
    weight matrices but the query bank's; ALTA: its adapter matrices only), none on the others."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if model.decays(name, p) else no_decay).append(p)
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
        out = module(images)
        labels = (torch.zeros_like(out.logits) if task == "multilabel"  # multi-hot targets
                  else torch.zeros(2, dtype=torch.long, device=device))
        terms = loss_fn(out, labels)
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


def say(info: D.DistInfo, *msg, level: int = logging.INFO) -> None:
    """A line for the user from the main rank only (the report logger, on stdout)."""
    if info.is_main:
        to_user.log(level, " ".join(str(m) for m in msg))


class GradientRun:
    """One training run of a model with learnable parameters (or none: zeroshot validates once).
    `run()` returns the summary. The state a checkpoint records lives on the instance: step, epoch,
    pos (micro-batches into the epoch), best, skipped (non-finite steps skipped). `stop` (stop.py):
    SIGTERM or a first Ctrl-C during `run()` stops it at the next step boundary, saved."""

    def __init__(self, config: TrainConfig, info: D.DistInfo, hooks: Hooks, model, data: TrainData, *, method: str,
                 model_name: str, fused: bool, tracker: Optional[Tracker] = None, stop: Optional[SigtermStop] = None):
        self.config, self.info, self.hooks, self.model, self.data = config, info, hooks, model, data
        self.method, self.model_name, self.fused = method, model_name, fused
        self.stop, self.stopping = stop or SigtermStop(), False  # stopping: every rank saw SIGTERM's flag
        self.stopped_by = None  # the signal every rank stops for (SIGTERM or SIGINT), when stopping
        self.done_already: Optional[Dict[str, Any]] = None  # a resumed checkpoint at or past this run's end
        self.device, self.out, self.main_rank = info.device, Path(config.out), info.is_main
        self.step = self.epoch = self.pos = self.skipped = 0
        self.best: Optional[float] = None
        # metrics.jsonl, mirrored to --report-to's trackers (tracking.py)
        self.log = TrackedLog(self.out / "metrics.jsonl", tracker, enabled=self.main_rank)
        self._prepare_data()
        self._prepare_objective()
        self._prepare_optimizer()
        self.last_good = None  # the step out/last.pt holds, for the message that stops a diverged run
        self.saved_at: Dict[str, Any] = {"step": None, "best": None}
        self.last_eval_step = -1
        self.bar = None  # the run's progress bar, while the steps run
        # what evaluation must not score unawares
        self.train_images = training_images(data.train, progress=not config.no_progress)

    # ----------------------------------------------------------------- set-up
    def _prepare_data(self) -> None:
        config, info = self.config, self.info
        self.dataset = make_dataset(self.data, self.model, config.seed, multiview=config.option("multiview"))
        # a training or validation set with no decodable image stops here, naming files
        require_decodable(self.data, self.dataset, config.val_data)
        per_rank = config.batch_size
        if len(self.dataset) < per_rank * info.world_size:
            new = max(1, len(self.dataset) // info.world_size)
            say(info, f"warning: {len(self.dataset)} training samples < global batch {per_rank * info.world_size}; "
                      f"using --batch-size {new} per process", level=logging.WARNING)
            per_rank = new
        self.per_rank = per_rank
        self.sampler = D.ShardedBatchSampler(len(self.dataset), per_rank, rank=info.rank, world_size=info.world_size,
                                             seed=config.seed, shuffle=True, drop_last=True)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=config.workers,
                                 collate_fn=collate_skip_bad, pin_memory=self.device.type == "cuda",
                                 generator=torch.Generator())
        micro_per_epoch = self.sampler.batches_per_epoch()
        self.steps_per_epoch = micro_per_epoch // config.accum_steps
        if self.steps_per_epoch < 1:
            raise UserError(f"{len(self.dataset)} samples make {micro_per_epoch} batches of {per_rank} x "
                            f"{info.world_size} processes: fewer than --accum-steps {config.accum_steps}")
        self.epochs = config.epochs or (math.ceil(config.max_steps / self.steps_per_epoch) if config.max_steps else 10)
        self.total = self.epochs * self.steps_per_epoch
        if config.max_steps:
            self.total = min(self.total, config.max_steps)
        self.warmup = config.warmup if config.warmup is not None else min(500, math.ceil(0.05 * self.total))

    def _prepare_objective(self) -> None:
        config, info, model, cfg = self.config, self.info, self.model, self.model.config
        if self.data.task == "retrieval":
            self.module = model
            self.loss_fn = NEARLLoss.from_config(cfg, rank=info.rank, world_size=info.world_size)
            probe_loss = NEARLLoss.from_config(cfg)
        elif self.data.task == "multilabel":  # positive vs negative prompts (nearl/model/multilabel.py)
            self.module, self.loss_fn, probe_loss = multilabel_objective(
                model, self.data.classnames, config.templates or list(TEMPLATES), self.device, cfg, info.rank,
                info.world_size)
        elif spec(self.method).objective is not None:  # BiomedCoOp: terms from its teacher prompts too
            self.module, self.loss_fn, probe_loss = spec(self.method).objective(
                model, self.data.classnames, config.templates or list(TEMPLATES), self.device, config, info.rank,
                info.world_size)
        else:
            prompts = class_prompt_tokens(model, self.data.classnames, config.templates or list(TEMPLATES))
            self.module = PromptClassifier(model, prompts.to(self.device), len(self.data.classnames)).to(self.device)
            self.loss_fn = ClassificationLoss.from_config(cfg, rank=info.rank, world_size=info.world_size)
            probe_loss = ClassificationLoss.from_config(cfg)
        self.params = list(model.trainable_parameters())
        if not self.params:  # zeroshot: nothing to learn; validate once and record a checkpoint naming the method
            say(info, f"method {self.method}: no learnable parameters; nothing is trained (validation and a "
                      "checkpoint only)")
            self.total = self.epochs = 0
        self.ddp, self.forward = None, self.module
        if info.distributed and self.params:
            unused = unused_parameters(self.module, model, probe_loss, self.data.task, self.device,
                                       _image_size(model), model.tokenizer())
            if unused:
                say(info, f"DDP: {len(unused)} learnable tensors get no gradient with this config "
                          f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): find_unused_parameters=True")
            else:
                say(info, "DDP: every learnable tensor gets a gradient: find_unused_parameters=False")
            self.ddp = self.forward = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(unused), broadcast_buffers=False)

    def _prepare_optimizer(self) -> None:
        config = self.config
        self.optimizer = self.scheduler = None
        if self.params:
            self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                               betas=(config.beta1, config.beta2), eps=config.eps)
            self.scheduler = warmup_cosine(self.optimizer, self.warmup, self.total, config.min_lr_ratio)
        fp16 = config.precision == "fp16" and self.params
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None

    def resume_or_seed(self) -> None:
        """Continue from --resume's checkpoint, or seed every generator from --seed."""
        config, info = self.config, self.info
        if not config.resume:
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)
            return
        ckpt = load_checkpoint(config.resume, map_location="cpu")
        if ckpt.get("task", "retrieval") != self.data.task:
            raise UserError(f"checkpoint task {ckpt.get('task')} != --task {self.data.task}")
        if canonical(ckpt.get("method") or DEFAULT_METHOD) != self.method:
            raise UserError(f"checkpoint method {ckpt.get('method')} != --method {self.method}")
        if self.params and ckpt["step"] >= self.total:  # nothing to train: run() says so and writes nothing
            self.done_already = ckpt
            return
        load_adapters(self.model, ckpt, self.device)
        self.train_images = training_images(self.data.train, ckpt.get("train_images"),  # trained on both
                                            progress=not self.config.no_progress)
        changed = changed_settings(ckpt.get("args", {}), config.to_dict())
        if changed:
            say(info, "resume: settings given again take effect: " + ", ".join(changed))
        if self.optimizer is not None:
            for line in resume_optimizer(self.optimizer, self.scheduler, ckpt, self.warmup, self.total,
                                         config.min_lr_ratio):
                say(info, "resume: " + line)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.pos = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.best, self.skipped = ckpt.get("best"), int(ckpt.get("nonfinite_skipped", 0))
        chosen_by = ckpt.get("args", {}).get("monitor") or MAIN_METRIC[self.data.task]
        if chosen_by != config.monitored():  # its best is a score of another metric: the next validation wins
            say(info, f"resume: best.pt was chosen by {chosen_by}; from now on by {config.monitored()} (--monitor)")
            self.best = None
        saved, s = ckpt.get("data", {}), self.sampler
        if saved and (saved.get("n"), saved.get("batch_size"), saved.get("world_size")) != (
                s.n, s.batch_size, s.world_size):
            say(info, f"warning: data layout changed since the checkpoint ({saved}); the data order "
                      "will not match an uninterrupted run", level=logging.WARNING)
        set_rng_state(ckpt["rng"])
        self.log.truncate_after(self.step)
        if (self.out / LAST).exists():
            self.last_good = self.step
        say(info, f"resumed from {ckpt['path']}: step {self.step}, epoch {self.epoch}, batch {self.pos} of the epoch")

    def announce(self) -> None:
        config, data, model = self.config, self.data, self.model
        if self.main_rank:
            model.print_parameter_breakdown()
            if spec(self.method).named_in_messages:
                to_user.info(f"method {self.method}: {model.num_trainable_parameters():,} learnable parameters")
            to_user.info(f"task {data.task}: {len(data.train)} training / {len(data.val)} validation records from "
                         f"{data.source}")
            to_user.info(f"{self.info.world_size} process(es) x batch {self.per_rank} x accumulation "
                         f"{config.accum_steps} = {self.per_rank * self.info.world_size * config.accum_steps} samples "
                         f"per step; {self.steps_per_epoch} steps per epoch; {self.total} steps ({self.epochs} epochs "
                         f"at most), warmup {self.warmup}; device {self.device}, precision {config.precision}"
                         f"{', fused kernels' if self.fused else ''}"
                         f"{', grad checkpointing' if model.grad_checkpointing else ''}")
        if not data.val:
            say(self.info, "no validation records: no per-epoch evaluation and no best.pt "
                           "(give the manifest a 'val' split or use --val-data)")

    # ----------------------------------------------------------------- checkpoints
    def state(self, tag_epoch: int, tag_pos: int, metrics: Optional[dict] = None) -> Dict[str, Any]:
        config, data = self.config, self.data
        return training_state(
            model_name=self.model_name, pretrained=config.pretrained, backbone_seed=config.seed,
            method=self.method, config=self.model.config.to_dict(), task=data.task, classnames=data.classnames,
            templates=(config.templates or list(TEMPLATES)) if data.task != "retrieval" else None,
            model={k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            optimizer=self.optimizer.state_dict() if self.optimizer is not None else None,
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            step=self.step, epoch=tag_epoch, batch_in_epoch=tag_pos, best=self.best,
            rng=rng_state(), data={**self.sampler.state_dict(), "epoch": tag_epoch, "start": tag_pos},
            args=config.to_dict(), metrics=metrics or {}, train_images=self.train_images)

    def kept(self) -> str:
        """Where the last good checkpoint is, for the message that stops a diverged run."""
        if self.last_good is None:
            return "No checkpoint was written"
        return f"Nothing after step {self.last_good} was saved: {self.out / LAST} holds step {self.last_good}"

    def again(self) -> str:
        """How to go on after a diverged validation: from the last good checkpoint, if one was written."""
        lower = f"a lower --lr (now {self.config.lr:g})"
        if self.last_good is None:
            return f"Start again with {lower} and --overwrite"
        return f"Resume from it with {lower} (--resume {self.out} --lr ...), or start again with --overwrite"

    def save(self, name: str, tag_epoch: int, tag_pos: int, metrics: Optional[dict] = None) -> None:
        # Every rank holds the same parameters, so every rank reaches the same verdict.
        check_finite_state(self.model.trainable_state_dict(), f"step {self.step}: {self.out / name}")
        D.barrier(self.info)
        if self.main_rank:
            state = {**self.state(tag_epoch, tag_pos, metrics), "nonfinite_skipped": self.skipped}
            save_checkpoint(state, self.out, name)
        if name == LAST:
            self.saved_at.update(step=self.step, best=self.best)
            self.last_good = self.step
        D.barrier(self.info)

    def plot(self) -> None:
        if self.main_rank:
            try:
                plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
            except Exception as e:  # a plot must never kill a run
                logger.warning("could not draw curves.png: %s", e)

    # ----------------------------------------------------------------- validation
    def validate(self) -> Optional[Dict[str, float]]:
        data = self.data
        if not data.val or self.last_eval_step == self.step:
            return None
        self.last_eval_step = self.step
        results, broken = None, None
        if self.main_rank:
            results = self._evaluate()
            monitor = self.config.monitored()  # --monitor, else the task's main metric
            score = headline(data.task, results, monitor)
            self.log.write({"kind": "val", "step": self.step, "epoch": self.epoch, **results, "score": score})
            shown = {k: v for k, v in results.items() if k in VALIDATION_SHOWN or k == monitor}
            to_user.info(f"validation at step {self.step}: {format_metrics(shown)}")
            bad = int(results.get("nonfinite_rows", 0))
            if bad:  # the metrics counted them as misses; the model itself is broken
                broken = (f"validation at step {self.step}: the model's outputs hold NaN or inf for {bad} inputs: "
                          f"it has diverged, so training stopped and it was not saved. {self.kept()}. {self.again()}")
            elif math.isfinite(score) and better(monitor, score, self.best):
                self.best = score
                state = {**self.state(self.epoch, self.pos, results), "nonfinite_skipped": self.skipped}
                save_checkpoint(state, self.out, BEST)
                to_user.info(f"new best {monitor + ' ' if self.config.monitor else ''}{score:.2f}: {self.out / BEST}")
        self.best, broken = D.broadcast_object((self.best, broken), self.info)  # every rank takes the same decisions
        if broken:
            raise NonFiniteError(broken)
        return results

    def _evaluate(self) -> Dict[str, float]:
        config, data = self.config, self.data
        kw = dict(device=self.device, batch_size=config.eval_batch_size or self.per_rank, workers=config.workers,
                  precision=config.precision, progress=False,  # the run's one bar says it validates
                  source=config.val_data or data.source)
        if self.bar is not None and not self.bar.disable:  # closed after the last step: disabled
            self.bar.set_postfix_str(f"validating {len(data.val)} records")
        if data.task == "retrieval":
            return evaluate_retrieval(self.model, data.val, **kw)
        if data.task == "multilabel":
            return evaluate_multilabel(self.model, data.val, data.classnames,
                                       templates=config.templates or TEMPLATES, **kw)
        return evaluate_classification(self.model, data.val, data.classnames, templates=config.templates or TEMPLATES,
                                       **kw)

    # ----------------------------------------------------------------- the loop
    def run(self) -> Dict[str, Any]:
        with self.stop.deferred():  # SIGTERM, Ctrl-C from here on: stop at the next step boundary, saved (stop.py)
            return self._run()

    def _run(self) -> Dict[str, Any]:
        self.resume_or_seed()
        if self.done_already is not None:
            return self.nothing_to_do()
        if self.main_rank:  # what runs, as a file `--config` runs again (after nothing_to_do, which writes nothing)
            config_file.write(self.config.to_dict(), self.out)
        self.announce()
        self.module.train()
        # One bar for the run (a notebook shows one widget): steps, ETA, and the step's loss and lr.
        self.bar = tqdm(total=self.total, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                        disable=self.config.no_progress or not self.main_rank)
        try:
            while self.step < self.total and self.epoch < self.epochs and not self.stopping:
                self.run_epoch()
        finally:
            self.bar.close()
        if self.stopping:
            self.stop_here()
        final = self.validate()
        if self.saved_at != {"step": self.step, "best": self.best}:
            self.save(LAST, self.epoch, self.pos, final)
        self.plot()
        out, skipped = self.out, self.skipped
        if self.main_rank:
            to_user.info(f"done: {self.step} steps{f' ({skipped} skipped as non-finite)' if skipped else ''}; "
                         f"checkpoints in {out} ({LAST}{', ' + BEST if (out / BEST).exists() else ''}), "
                         f"metrics in {out / 'metrics.jsonl'}, curves in {out / 'curves.png'}")
        self.log.close()
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "best": self.best, "out": str(self.out), "method": self.method,
                "learnable_parameters": self.model.num_trainable_parameters(), "nonfinite_skipped": self.skipped}

    def nothing_to_do(self) -> Dict[str, Any]:
        """--resume of a checkpoint at or past the step this run ends at: said, and nothing written (the
        checkpoint, metrics.jsonl and curves stay as they were), exit status 0."""
        ckpt, config = self.done_already, self.config
        self.step, self.epoch, self.best = ckpt["step"], ckpt["epoch"], ckpt.get("best")
        self.skipped = int(ckpt.get("nonfinite_skipped", 0))
        end = f"--max-steps {config.max_steps}" if config.max_steps and config.max_steps <= self.total else (
            f"{self.epochs} epochs of {self.steps_per_epoch} steps")
        say(self.info, f"nothing to do: {ckpt['path']} holds step {self.step}, and this run ends at step {self.total} "
                       f"({end}); nothing was trained or written. Give a larger --max-steps (or --epochs) to "
                       "train further")
        self.log.close()
        return {**self.summary(), "nothing_to_do": True}

    def stop_here(self) -> None:
        """SIGTERM or Ctrl-C reached a step boundary (stop.py): save this step, close the log, and say where
        it stopped."""
        if self.saved_at != {"step": self.step, "best": self.best}:
            self.save(LAST, self.epoch, self.pos)
        self.plot()
        self.log.close()
        raise self.stop.stopped(self.stopped_by, f"after step {self.step} of {self.total}: {self.out / LAST} holds "
                                                 f"it; continue with python -m nearl.train --resume {self.out}")

    def run_epoch(self) -> None:
        """The rest of the current epoch (from micro-batch `pos`), then its validation and checkpoint."""
        config, accum = self.config, self.config.accum_steps
        self.sampler.set_epoch(self.epoch, start=self.pos)
        self.dataset.set_epoch(self.epoch)
        self.group: List[Dict[str, float]] = []
        self.micro, self.seen, self.t0 = 0, 0, time.perf_counter()
        for batch in self.loader:
            if self.pos >= self.steps_per_epoch * accum:
                break
            self.pos += 1
            self.micro += 1
            self.micro_batch(batch, last_micro=self.micro == accum)
            if self.micro < accum:
                continue
            record = self.optimizer_step()
            self.bar.update(1)
            self.bar.set_postfix(epoch=f"{self.epoch + 1}/{self.epochs}", loss=f"{record.get('loss', float('nan')):.4f}",
                                 lr=f"{record['lr']:.2e}", samples_s=f"{record['samples_per_s'] or 0:.1f}")
            at_epoch_end = self.pos >= self.steps_per_epoch * accum
            if config.save_every and self.step % config.save_every == 0 and not at_epoch_end and self.step < self.total:
                self.save(LAST, self.epoch, self.pos)
            self.hooks.on_step(self.step, record)
            if self.step >= self.total or self.stopping:
                break
        report_skips(self.dataset, self.log, step=self.step, source=self.data.source)  # once per data set
        if self.pos >= self.steps_per_epoch * accum and not self.stopping:  # a full epoch (SIGTERM: run() saves)
            self.epoch, self.pos = self.epoch + 1, 0
            every = self.epochs_between_validations()
            if every and self.epoch % every == 0 and self.validate() is not None:
                self.plot()  # the curves are redrawn with each validation, and at the end
            if config.eval_every is not None or self.epoch % max(every, 1) == 0:
                self.save(LAST, self.epoch, self.pos)  # the end of the run saves too (run())

    def epochs_between_validations(self) -> int:
        """--eval-every, else every epoch, or every ceil(epochs / AUTO_VALIDATIONS) epochs in a run of more
        epochs (few-shot: epochs of one or a few steps), where last.pt is saved as often: a long run of
        short epochs validates and fsyncs about AUTO_VALIDATIONS times, not once a step."""
        if self.config.eval_every is not None:
            return self.config.eval_every
        return max(1, math.ceil(self.epochs / AUTO_VALIDATIONS))

    def micro_batch(self, batch, last_micro: bool) -> None:
        """Forward and backward of one micro-batch, its loss terms kept for the step's record."""
        info, device = self.info, self.device
        n_local = 0 if batch is None else int(batch[0].shape[0])
        n = D.all_reduce_min(n_local, info)  # equal sizes on every rank (gathered loss)
        if n == 0:
            if self.ddp is not None and last_micro and self.group:
                _sync_grads(self.params, info)  # the synced backward of this group never happened
            return
        # (images, tokens | labels), or (views, view_mask, tokens) with --multiview
        images, second = batch[0][:n].to(device, non_blocking=True), batch[-1][:n].to(device, non_blocking=True)
        extra = tuple(t[:n].to(device, non_blocking=True) for t in batch[1:-1])
        sync = self.ddp.no_sync() if (self.ddp is not None and not last_micro) else nullcontext()
        with sync:
            with autocast(device, self.config.precision):
                if self.data.task == "retrieval":
                    terms = self.loss_fn(self.forward(images, second, *extra))
                else:
                    terms = self.loss_fn(self.forward(images), second)
            loss = terms["loss"] / self.config.accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.group.append({k: float(v.detach()) for k, v in terms.items()})
        self.seen += n * info.world_size

    def optimizer_step(self) -> Dict[str, Any]:
        """The step of an accumulation group, unless its loss or gradients are not finite (then the
        parameters and the optimizer's moments stay as they were); its record, logged."""
        config, scaler, optimizer = self.config, self.scaler, self.optimizer
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = config.grad_clip if config.grad_clip and config.grad_clip > 0 else math.inf  # inf: the norm only
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        bad_grad, mean = self._reduce_group(grad_norm)
        bad_loss = not all(math.isfinite(v) for v in mean.values())
        # With fp16, inf gradients are the GradScaler's to handle: it skips the step and lowers the scale.
        nonfinite = bad_loss or (bad_grad and scaler is None)
        lr = optimizer.param_groups[0]["lr"]
        if nonfinite:
            self.skipped += 1
        elif scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.micro = 0
        dt = time.perf_counter() - self.t0
        record = {"kind": "train", "step": self.step, "epoch": self.epoch, "lr": lr, **mean, "samples": self.seen,
                  "samples_per_s": self.seen / dt if dt > 0 else None, "grad_norm": grad_norm}
        if scaler is not None:
            record["loss_scale"] = float(scaler.get_scale())
        if nonfinite:
            record["nonfinite_skipped"] = self.skipped
        self.log.write(record)
        if nonfinite:
            self._stop_or_skip(bad_loss, mean, grad_norm)
        self.group, self.seen, self.t0 = [], 0, time.perf_counter()
        return record

    def _reduce_group(self, grad_norm: float):
        """(whether any rank's gradients were non-finite, the group's mean loss terms over all ranks);
        `self.stopping` becomes whether any rank was sent SIGTERM or SIGINT before the run's last step
        (which finishes the run as usual), `self.stopped_by` which (stop.py). One collective, so every
        rank takes the same decisions."""
        group = self.group
        keys = sorted({k for g in group for k in g})
        mean = {k: sum(g[k] for g in group if k in g) / max(1, sum(k in g for g in group)) for k in keys}
        signals = self.stop.flags()
        flags = [float(not math.isfinite(grad_norm)), *signals] + [mean[k] for k in keys]
        reduced = D.all_reduce_mean(torch.tensor(flags, dtype=torch.float64), self.info).tolist()
        self.stopped_by = self.stop.agreed(reduced[1:1 + len(signals)])
        self.stopping = self.stopped_by is not None and self.step + 1 < self.total  # self.step: the steps before
        return reduced[0] > 0, dict(zip(keys, reduced[1 + len(signals):]))

    def _stop_or_skip(self, bad_loss: bool, mean: Dict[str, float], grad_norm: float) -> None:
        config, skipped = self.config, self.skipped
        if skipped > config.skip_nonfinite:
            what = f"loss is {mean.get('loss')}" if bad_loss else f"gradient norm is {grad_norm}"
            earlier = (f" after {skipped - 1} such step(s) skipped (--skip-nonfinite {config.skip_nonfinite})"
                       if config.skip_nonfinite else "")
            raise NonFiniteError(f"step {self.step}: the {what}{earlier}; training stopped without applying it. "
                                 f"{self.kept()}. Lower --lr (now {config.lr:g}), check the data, or pass "
                                 f"--skip-nonfinite N to skip up to N such steps")
        say(self.info, f"step {self.step}: non-finite {'loss' if bad_loss else 'gradients'}: step skipped "
                       f"({skipped} of at most {config.skip_nonfinite})")
