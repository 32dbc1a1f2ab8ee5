"""Comparison of adaptation methods, the library: a comparison's runs (each
trained by `nearl.training.fit` and evaluated by `nearl.evaluation.run`) and their measurements;
the report and the plot are comparison_report.py's. `python -m nearl.compare` is its command line;
its options and their description are in comparison_options.py (no torch: --help answers at once)."""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from nearl.evaluation import run as EV
from nearl.evaluation.multilabel import evaluate_multilabel
from nearl import training
from nearl.argtypes import MAX_SEED
from nearl.store.checkpoint import LAST, load_checkpoint
from nearl.cli_args import check_backbone, check_out_dir, resolve_device, user_errors
from nearl.errors import UserError
from nearl.logging_utils import read_metrics, reporter
from nearl.comparison.config import CompareConfig
from nearl.comparison.options import DESCRIPTION, build_parser, parse_config  # noqa: F401 (nearl.comparison.run.*)
from nearl.methods import build_from_checkpoint, canonical, check_task, methods_for, spec
from nearl.comparison.report import MAIN_METRIC, SHOWN, write_report
from nearl.comparison.protocols import (B2N_KEYS, Run, check_shots, comma_ints, eval_sets, harmonic_mean, parse_shots,
                        plan, run_metrics)
from nearl.comparison.protocols import check as check_protocol
from nearl.training.run_dir import run_files
from nearl.data.overlap import training_images
from nearl.training.config import TrainConfig
from nearl.training.data import load_train_data

logger = logging.getLogger("nearl.compare")
to_user = reporter("compare")  # the lines the user reads (nearl.logging_utils.reporter)

PIPELINE_NOTE = ("These numbers only show that the pipeline runs: {why}. They say nothing about "
                 "which method is better.")


# ----------------------------------------------------------------------------- arguments
def _methods(config: CompareConfig) -> List[str]:
    if not config.methods:
        return list(methods_for(config.task))
    with user_errors("--methods: "):
        chosen = [canonical(m) for m in config.methods.split(",") if m.strip()]
    if not chosen:
        raise UserError(f"--methods {config.methods!r} names no method")
    bad = [m for m in chosen if m not in methods_for(config.task)]
    if bad:
        raise UserError(f"method(s) {', '.join(bad)} do not apply to task {config.task!r} "
                         f"(it takes: {', '.join(methods_for(config.task))}); drop them or change --task")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--methods: a method is listed twice: {chosen}")
    return chosen


def _seeds(text: str) -> List[int]:
    seeds = comma_ints(text, "--seeds")
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: a seed is listed twice: {seeds}")
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"--seeds: each seed must be in [0, 2**63 - 1] (a 64-bit generator seed), got {bad[0]}")
    return seeds


def train_config(config: CompareConfig, run: Run, model_name: str) -> TrainConfig:
    """The TrainConfig of one run: the comparison's shared settings, then --train-args and the method's
    --method-args (parsed as nearl.train parses them, a later flag winning), then the run's own (its K,
    its classes); each value checked as nearl.train's command line checks it."""
    shared = TrainConfig(
        method=run.method, seed=run.seed, max_steps=config.max_steps, task=config.task, model=model_name,
        batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay, precision=config.precision,
        workers=config.workers, eval_every=0, out=str(run.folder), format=config.format,
        pretrained=config.pretrained, data=config.data, val_data=config.val_data, root=config.root,
        label_column=config.label_column, label_columns=config.label_columns, label_separator=config.label_separator,
        uncertain_labels=config.uncertain_labels,
        k_shot=config.k_shot, warmup=config.warmup, device=config.device, eval_batch_size=config.eval_batch_size,
        templates=list(config.templates) if config.templates else None, fused=bool(config.fused),
        overwrite=bool(config.overwrite), no_progress=bool(config.no_progress))
    extra = config.train_args.split() + method_args(config).get(run.method, [])
    derived = shared.replace(**training.given_settings(extra)).replace(**dict(run.train))
    training.check_flags(derived)
    return derived


def method_args(config: CompareConfig) -> Dict[str, List[str]]:
    """--method-args "alta=--multiview" ... -> {"alta": ["--multiview"]}."""
    out: Dict[str, List[str]] = {}
    for item in config.method_args or []:
        if "=" not in item:
            raise UserError(f"--method-args takes METHOD=ARGS, got {item!r}")
        name, rest = item.split("=", 1)
        with user_errors("--method-args: "):
            name = canonical(name)
        out.setdefault(name, []).extend(rest.split())
    return out


def _check_training_data(config: CompareConfig, run: Run, model_name: str, sets: Dict[str, tuple]) -> None:
    """Before any run: the images the runs train on (drawn from, with --k-shot) must give every K of
    few-shot's --shots for every class, and must not be among the evaluated ones (--allow-train-data)."""
    pool = training_pool(config, run, model_name)
    if config.protocol == "few-shot":
        check_shots(parse_shots(config.shots), pool.train, pool.classnames)
    trained = training_images(pool.train, progress=not config.no_progress)
    for records, _classes, split, source in sets.values():
        EV.check_training_overlap(trained, records, f"{source}, split {split}", "among the images the runs train "
                                  f"on ({pool.source})", config.allow_train_data, progress=not config.no_progress)


def training_pool(config: CompareConfig, run: Run, model_name: str):
    """The training data (nearl.training.data.TrainData) a run of this comparison reads, as nearl.train
    reads it, before any --k-shot draw."""
    return load_train_data(train_config(config, run, model_name).replace(k_shot=None))


# ----------------------------------------------------------------------------- measurements
def step_time(metrics_path: Path) -> Optional[float]:
    """Median seconds per optimizer step from metrics.jsonl (the first step left out when there are more)."""
    times = [r["samples"] / r["samples_per_s"] for r in read_metrics(metrics_path)
             if r.get("kind") == "train" and r.get("samples_per_s")]
    if len(times) > 1:
        times = times[1:]
    if not times:
        return None
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


@torch.no_grad()
def inference_throughput(model, device: torch.device, batch: int, iters: int, precision: str) -> float:
    """Images per second through model.encode_image on a fixed random batch, after 2 warm-up calls."""
    size = model.tower("vision").image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g).to(device)
    was_training = model.training
    model.eval()
    try:
        with EV.autocast(device, precision):
            for _ in range(2):
                model.encode_image(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                model.encode_image(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return batch * iters / (time.perf_counter() - t0)
    finally:
        model.train(was_training)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (ru_maxrss: KB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None with one value) of the non-None values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals), "values": list(values)}


# ----------------------------------------------------------------------------- one run
def run_one(config: CompareConfig, run: Run, model_name: str, device: torch.device, eval_sets: Dict[str, tuple],
            bench: bool) -> Dict[str, Any]:
    """Train `run` with nearl.train, rebuild its final checkpoint, evaluate it on every eval set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = run.folder
    t0 = time.perf_counter()
    summary = training.fit(train_config(config, run, model_name))
    train_wall = time.perf_counter() - t0
    ckpt = load_checkpoint(out / LAST)
    model = build_from_checkpoint(ckpt, fused=config.fused and device.type == "cuda").to(device).eval()
    kw = dict(device=device, batch_size=config.eval_batch_size or config.batch_size, workers=config.workers,
              precision=config.precision, progress=not config.no_progress)
    results = {}
    for name, (records, classnames, _split, _src) in eval_sets.items():
        if config.task == "retrieval":
            results[name] = EV.evaluate_retrieval(model, records, **kw)
        elif config.task == "multilabel":  # per-class AUROC (nearl/evaluation/multilabel.py)
            results[name] = evaluate_multilabel(model, records, classnames, details=True,  # per-class AUROC too
                                                templates=config.templates or EV.TEMPLATES,
                                                uncertain=config.uncertain_labels, **kw)
        else:
            results[name] = EV.evaluate_classification(model, records, classnames,
                                                       templates=config.templates or EV.TEMPLATES, **kw)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    ips = (inference_throughput(model, device, config.bench_batch, config.bench_iters, config.precision)
           if bench else None)
    return {"seed": run.seed, "shots": run.shots, "steps": summary["step"],
            "metrics": run_metrics(config.protocol, results), "results": results,
            "learnable_parameters": model.num_trainable_parameters(),
            "time_per_step_s": step_time(out / "metrics.jsonl") if summary["step"] else None,
            "train_wall_s": train_wall, "peak_memory_mb": peak, "inference_images_per_s": ips,
            "checkpoint": str(out / LAST), "split": next(iter(eval_sets.values()))[2],
            "extra": {k: v for k, v in summary.items() if k in ("weight_decay",)}}


# ----------------------------------------------------------------------------- report
def summarise(runs: Dict[str, List[Dict[str, Any]]], task: str) -> Dict[str, Dict[str, Any]]:
    out = {}
    for method, rs in runs.items():
        keys = [k for k in rs[0]["metrics"] if isinstance(rs[0]["metrics"][k], (int, float)) and not k.startswith("n_")]
        out[method] = {
            "metrics": {k: mean_std([r["metrics"].get(k) for r in rs]) for k in keys},
            "learnable_parameters": rs[0]["learnable_parameters"],
            "time_per_step_s": mean_std([r["time_per_step_s"] for r in rs]),
            "train_wall_s": mean_std([r["train_wall_s"] for r in rs]),
            "peak_memory_mb": mean_std([r["peak_memory_mb"] for r in rs]),
            "inference_images_per_s": next((r["inference_images_per_s"] for r in rs
                                            if r["inference_images_per_s"] is not None), None),
            "runs": rs,
        }
    return out


def summarise_by_shots(runs: Dict[str, List[Dict[str, Any]]], task: str) -> Dict[str, Dict[str, Any]]:
    """few-shot: per method, `summarise` of the runs of each K."""
    out = {}
    for method, rs in runs.items():
        shots = sorted({r["shots"] for r in rs})
        out[method] = {"learnable_parameters": rs[0]["learnable_parameters"],
                       "shots": {str(k): summarise({method: [r for r in rs if r["shots"] == k]}, task)[method]
                                 for k in shots}}
    return out


# ----------------------------------------------------------------------------- main
def _check_earlier_runs(runs: Sequence[Run], overwrite: bool) -> None:
    """Refuse, before any work, to train over an earlier comparison's runs unless --overwrite (which
    each training run then applies to its own folder)."""
    if overwrite:
        return
    held = [str(r.folder) for r in runs if run_files(r.folder)]
    if held:
        raise UserError(f"{held[0]}{f' and {len(held) - 1} more' if len(held) > 1 else ''} already hold runs of an "
                        f"earlier comparison; pass --overwrite to run it again there, or choose another --out")


def _pipeline_note(config: CompareConfig, model_name: str) -> Optional[str]:
    why = []
    if config.pretrained is None:
        why.append(f"the {model_name} backbone is RANDOM (no --pretrained), not CLIP")
    if config.data is None:
        why.append("the data are the tiny embedded demo set (nearl.data.demo), whose views of one image "
                   "land in several splits")
    return PIPELINE_NOTE.format(why="; ".join(why)) if why else None


def _run_all(config: CompareConfig, runs: List[Run], model_name: str, device: torch.device,
             sets: Dict[str, tuple]) -> Dict[str, List[Dict[str, Any]]]:
    """Every planned run, with a line before and after each; {method: [its runs' results]}."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for i, run in enumerate(runs, 1):
        what = spec(run.method).training_note.format(steps=config.max_steps)
        label = f"method {run.method}, " + ("" if run.shots is None else f"K = {run.shots}, ") + f"seed {run.seed}"
        to_user.info(f"\n=== [{i}/{len(runs)}] {label}: {what} ===")
        first = not any(r.method == run.method for r in runs[:i - 1])
        r = run_one(config, run, model_name, device, sets, bench=first)
        out.setdefault(run.method, []).append(r)
        shown = {k: v for k, v in r["metrics"].items() if k in SHOWN[config.task] + B2N_KEYS}
        to_user.info(f"=== [{i}/{len(runs)}] {label}: " + " ".join(f"{k}={v:.2f}" for k, v in shown.items()) +
                     f", {r['learnable_parameters']:,} learnable parameters, {r['train_wall_s']:.1f}s ===")
    return out


def _report(config: CompareConfig, methods, seeds, model_name, device, note, sets, runs, out: Path) -> Dict[str, Any]:
    first = next(iter(sets.values()))
    b2n = config.protocol == "base2novel"
    report = {
        "task": config.task, "protocol": config.protocol, "data": first[3], "split": first[2], "device": str(device),
        "note": note, "main_metric": "hm" if b2n else MAIN_METRIC[config.task],
        "shown": list(B2N_KEYS) if b2n else list(SHOWN[config.task]),
        "plotted": list(B2N_KEYS) if b2n else [MAIN_METRIC[config.task]],
        "config": {"methods": methods, "seeds": seeds, "max_steps": config.max_steps, "model": model_name,
                   "pretrained": config.pretrained, "batch_size": config.batch_size, "lr": config.lr,
                   "weight_decay": config.weight_decay, "precision": config.precision, "k_shot": config.k_shot,
                   "shots": sorted({r["shots"] for rs in runs.values() for r in rs}) if config.protocol == "few-shot"
                   else None, "bench_batch": config.bench_batch, "bench_iters": config.bench_iters,
                   "train_args": config.train_args, "method_args": method_args(config),
                   "train_data": config.data or "embedded demo set"},
        "peak_rss_mb": peak_rss_mb(), "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else
        "n/a on CPU (see peak_rss_mb: this process's peak RSS over the whole comparison)",
        "files": {"md": str(out / "comparison.md"), "json": str(out / "comparison.json"),
                  "png": str(out / "comparison.png")},
    }
    if b2n:
        report["classes"] = {name: list(data[1]) for name, data in sets.items()}
    summary = summarise_by_shots if config.protocol == "few-shot" else summarise
    report["methods"] = summary(runs, config.task)
    if b2n:  # the harmonic mean of the mean accuracies, as CoCoOp's tables give it; std over seeds kept
        for m in report["methods"].values():
            base, novel = m["metrics"]["base"]["mean"], m["metrics"]["novel"]["mean"]
            m["metrics"]["hm"]["mean"] = harmonic_mean(base, novel)
    return report


def compare(config: CompareConfig) -> Dict[str, Any]:
    """Run the comparison `config` describes (`python -m nearl.compare`; CompareConfig(...) from Python)
    and write its report; returns the report."""
    if not isinstance(config, CompareConfig):
        raise TypeError(f"compare takes a CompareConfig (nearl.comparison.config), got {type(config).__name__}")
    methods, seeds = _methods(config), _seeds(config.seeds)
    methods = check_protocol(config, methods, chosen_by_user=bool(config.methods))
    unknown = sorted(set(method_args(config)) - set(methods))
    if unknown:
        raise UserError(f"--method-args for {unknown}, which are not among --methods {methods}")
    with user_errors():
        for m in methods:
            check_task(m, config.task)
    device = resolve_device(config.device)
    EV.check_templates(config.templates)
    check_out_dir(config.out)
    model_name = config.model or EV.default_model_name(config.pretrained)
    check_backbone(model_name, config.pretrained)
    out = Path(config.out)
    runs = plan(config, methods, seeds, out)
    _check_earlier_runs(runs, config.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    note = _pipeline_note(config, model_name)
    if note:
        to_user.warning(f"NOTE: {note}")
    sets = eval_sets(config)
    _check_training_data(config, runs[0], model_name, sets)
    results = _run_all(config, runs, model_name, device, sets)
    report = _report(config, methods, seeds, model_name, device, note, sets, results, out)
    md = write_report(report, out)
    to_user.info("\n" + md)
    to_user.info(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}")
    return report
