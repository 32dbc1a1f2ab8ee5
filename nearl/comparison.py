"""Comparison of adaptation methods, the library: the options of a comparison, its runs (each
trained by `nearl.training.fit` and evaluated by `nearl.evaluation`) and their measurements;
the report and the plot are comparison_report.py's. `python -m nearl.compare` is its command line; its description below."""
from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import evaluation as EV
from . import training
from .argtypes import MAX_SEED, Parser, non_negative_int, positive_int, steps
from .checkpoint import LAST, load_checkpoint
from .cli_args import check_backbone, check_out_dir, resolve_device, user_errors
from .errors import UserError
from .logging_utils import read_metrics
from .methods import METHODS, build_from_checkpoint, canonical, check_task, methods_for
from .comparison_report import MAIN_METRIC, SHOWN, write_report
from .protocols import (B2N_KEYS, PROTOCOLS, Run, check_shots, comma_ints, eval_sets, harmonic_mean, parse_shots,
                        plan, run_metrics)
from .protocols import check as check_protocol
from .run_dir import run_files
from .data.overlap import training_images
from .training.data import load_train_data

logger = logging.getLogger("nearl.compare")

DESCRIPTION = """Compare adaptation methods fairly: same backbone, data, seeds and step budget, one command.

    python -m nearl.compare --max-steps 2 --seeds 0,1 --out runs/cmp          # embedded demo set, CPU
    python -m nearl.compare --model ViT-B-16 --pretrained openai --task classification \\
        --data split.json --root images/ --k-shot 16 --methods nearl,alta,clip-adapter,coop,linear-probe,zeroshot \\
        --seeds 0,1,2 --max-steps 500 --batch-size 32 --precision bf16 --out runs/cmp
    python -m nearl.compare --protocol base2novel --data split.json --k-shot 16 --seeds 1,2,3 ...
    python -m nearl.compare --protocol few-shot --shots 1,2,4,8,16 --data split.json --seeds 1,2,3 ...

Protocols: standard (above); base2novel (CoOp's): every run trains on the base classes (the first
half of the class list, nearl.train --classes base) and is evaluated on the base and on the novel
classes of --split, each among its own classes, reported as base, novel and their harmonic mean HM
(linear-probe cannot score unseen classes and is left out); few-shot: one run per K of --shots
(nearl.train --k-shot K), accuracy against K as a table and a plot; a K some class of the training
data cannot give is refused. Evaluation images that are among the training images are refused
before any run, unless --allow-train-data.

Every (method, seed) is trained in this process by nearl.train (same data pipeline, loop, optimiser,
schedule and checkpoints; --max-steps optimizer steps, or L-BFGS iterations for linear-probe, none
for zeroshot), then its final checkpoint (last.pt, not the best on validation: equal budgets) is
rebuilt and evaluated by nearl.evaluate on --split (default test; falls back to val). Seeds fix the
data order, the initial weights and, without --pretrained, the random backbone, which is then the
same for every method of one seed.

Outputs in --out: comparison.md and comparison.json (task metrics as mean and standard deviation
over seeds, learnable parameters, training time per step, peak memory, inference images/s),
comparison.png (the main metric with std error bars), and runs/<method>/seed<k>/ (each run's
metrics.jsonl, curves.png and checkpoints).

Measurements: time per step is the median wall time of an optimizer step (data loading included;
the first step, which pays for warm-up, is left out when there are more); peak memory is
torch.cuda.max_memory_allocated over training and evaluation on a GPU, and "n/a" on CPU (the JSON
then gives the process's peak RSS, which only grows over the whole comparison); inference images/s
is encode_image on a fixed batch of random images, after warm-up, for the first seed's model.
"""
PIPELINE_NOTE = ("These numbers only show that the pipeline runs: {why}. They say nothing about "
                 "which method is better.")


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m nearl.compare", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help="comma-separated, from " + ", ".join(METHODS) +
                   " (default: every method that applies to --task)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="standard (default): train on "
                   "--data, evaluate on --split; base2novel: train on the base classes, report base, novel and "
                   "their harmonic mean; few-shot: accuracy against K for each K of --shots (classification)")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot: images per class, comma-separated "
                   "(default %(default)s)")
    p.add_argument("--max-steps", type=steps, default=100, help="optimizer steps per run (L-BFGS iterations "
                   "per candidate for linear-probe); default %(default)s")
    p.add_argument("--task", choices=("retrieval", "classification"), default="classification")
    p.add_argument("--model", help="open_clip architecture (default: ViT-B-16 with a GPU or --pretrained, "
                   "NEARL-Tiny otherwise)")
    p.add_argument("--pretrained", help="backbone weights (default: none = random backbone)")
    p.add_argument("--data", help="as nearl.train --data (default: the embedded demo set)")
    p.add_argument("--val-data")
    p.add_argument("--test-data", help="evaluation source (default: --data, split --split)")
    p.add_argument("--format", default="auto")
    p.add_argument("--root")
    p.add_argument("--k-shot", type=positive_int)
    p.add_argument("--templates", nargs="+")
    p.add_argument("--split", default="test", help="evaluated split (default test; falls back to val)")
    p.add_argument("--allow-train-data", action="store_true", help="evaluate on images the runs train on "
                   "(refused by default), with a warning")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--eval-batch-size", type=positive_int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=non_negative_int)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--fused", action="store_true", help="nearl's Triton kernels (CUDA only)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--bench-batch", type=positive_int, default=32, help="batch of the inference throughput probe")
    p.add_argument("--bench-iters", type=positive_int, default=10, help="timed iterations of that probe (after 2 warm-up)")
    p.add_argument("--train-args", default="", help="extra nearl.train arguments for every run, one string "
                   "(e.g. \"--grad-clip 0.5\")")
    p.add_argument("--method-args", action="append", default=[], metavar="METHOD=ARGS",
                   help="extra nearl.train arguments for one method, e.g. \"alta=--multiview\" or "
                        "\"coop=--n-ctx 8\" (repeatable)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--overwrite", action="store_true",
                   help="run again over an earlier comparison in --out (each run's folder is emptied first)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _methods(args) -> List[str]:
    if not args.methods:
        return list(methods_for(args.task))
    with user_errors("--methods: "):
        chosen = [canonical(m) for m in args.methods.split(",") if m.strip()]
    if not chosen:
        raise UserError(f"--methods {args.methods!r} names no method")
    bad = [m for m in chosen if m not in methods_for(args.task)]
    if bad:
        raise UserError(f"method(s) {', '.join(bad)} do not apply to task {args.task!r} "
                         f"(it takes: {', '.join(methods_for(args.task))}); drop them or change --task")
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


def train_argv(args, method: str, seed: int, out: Path, model_name: str) -> List[str]:
    argv = ["--method", method, "--seed", seed, "--max-steps", args.max_steps, "--task", args.task,
            "--model", model_name, "--batch-size", args.batch_size, "--lr", args.lr,
            "--weight-decay", args.weight_decay, "--precision", args.precision, "--workers", args.workers,
            "--eval-every", 0, "--out", out, "--format", args.format]
    for flag, value in (("--pretrained", args.pretrained), ("--data", args.data), ("--val-data", args.val_data),
                        ("--root", args.root), ("--k-shot", args.k_shot), ("--warmup", args.warmup),
                        ("--device", args.device), ("--eval-batch-size", args.eval_batch_size)):
        if value is not None:
            argv += [flag, value]
    if args.templates:
        argv += ["--templates", *args.templates]
    if args.fused:
        argv.append("--fused")
    if args.overwrite:
        argv.append("--overwrite")
    if args.no_progress:
        argv.append("--no-progress")
    argv += args.train_args.split()
    argv += method_args(args).get(method, [])
    return [str(a) for a in argv]


def method_args(args) -> Dict[str, List[str]]:
    """--method-args "alta=--multiview" ... -> {"alta": ["--multiview"]}."""
    out: Dict[str, List[str]] = {}
    for item in args.method_args or []:
        if "=" not in item:
            raise UserError(f"--method-args takes METHOD=ARGS, got {item!r}")
        name, rest = item.split("=", 1)
        with user_errors("--method-args: "):
            name = canonical(name)
        out.setdefault(name, []).extend(rest.split())
    return out


def _check_training_data(args, run: Run, model_name: str, sets: Dict[str, tuple]) -> None:
    """Before any run: the images the runs train on (drawn from, with --k-shot) must give every K of
    few-shot's --shots for every class, and must not be among the evaluated ones (--allow-train-data)."""
    pool = training_pool(args, run, model_name)
    if args.protocol == "few-shot":
        check_shots(parse_shots(args.shots), pool.train, pool.classnames)
    trained = training_images(pool.train)
    for records, _classes, split, source in sets.values():
        EV.check_training_overlap(trained, records, f"{source}, split {split}", "among the images the runs train "
                                  f"on ({pool.source})", args.allow_train_data)


def training_pool(args, run: Run, model_name: str):
    """The training data (nearl.training.data.TrainData) a run of this comparison reads, as nearl.train
    reads it, before any --k-shot draw."""
    train_args = training.parse_args(train_argv(args, run.method, run.seed, run.folder, model_name) +
                                     list(run.extra_argv))
    train_args.k_shot = None
    return load_train_data(train_args)


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
def run_one(args, run: Run, model_name: str, device: torch.device, eval_sets: Dict[str, tuple],
            bench: bool) -> Dict[str, Any]:
    """Train `run` with nearl.train, rebuild its final checkpoint, evaluate it on every eval set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = run.folder
    t0 = time.perf_counter()
    argv = train_argv(args, run.method, run.seed, out, model_name) + list(run.extra_argv)
    summary = training.fit(training.parse_args(argv))
    train_wall = time.perf_counter() - t0
    ckpt = load_checkpoint(out / LAST)
    model = build_from_checkpoint(ckpt, fused=args.fused and device.type == "cuda").to(device).eval()
    kw = dict(device=device, batch_size=args.eval_batch_size or args.batch_size, workers=args.workers,
              precision=args.precision, progress=not args.no_progress)
    results = {}
    for name, (records, classnames, _split, _src) in eval_sets.items():
        if args.task == "retrieval":
            results[name] = EV.evaluate_retrieval(model, records, **kw)
        else:
            results[name] = EV.evaluate_classification(model, records, classnames,
                                                       templates=args.templates or EV.TEMPLATES, **kw)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    ips = inference_throughput(model, device, args.bench_batch, args.bench_iters, args.precision) if bench else None
    return {"seed": run.seed, "shots": run.shots, "steps": summary["step"],
            "metrics": run_metrics(args.protocol, results), "results": results,
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


def _pipeline_note(args, model_name: str) -> Optional[str]:
    why = []
    if args.pretrained is None:
        why.append(f"the {model_name} backbone is RANDOM (no --pretrained), not CLIP")
    if args.data is None:
        why.append("the data are the tiny embedded demo set (nearl.data.demo), whose views of one image "
                   "land in several splits")
    return PIPELINE_NOTE.format(why="; ".join(why)) if why else None


def _run_all(args, runs: List[Run], model_name: str, device: torch.device,
             sets: Dict[str, tuple]) -> Dict[str, List[Dict[str, Any]]]:
    """Every planned run, with a line before and after each; {method: [its runs' results]}."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for i, run in enumerate(runs, 1):
        what = {"zeroshot": "no training", "linear-probe": f"fitting, {args.max_steps} L-BFGS iterations "
                "per weight-decay candidate"}.get(run.method, f"training {args.max_steps} steps")
        label = f"method {run.method}, " + ("" if run.shots is None else f"K = {run.shots}, ") + f"seed {run.seed}"
        print(f"\n=== [{i}/{len(runs)}] {label}: {what} ===", flush=True)
        first = not any(r.method == run.method for r in runs[:i - 1])
        r = run_one(args, run, model_name, device, sets, bench=first)
        out.setdefault(run.method, []).append(r)
        shown = {k: v for k, v in r["metrics"].items() if k in SHOWN[args.task] + B2N_KEYS}
        print(f"=== [{i}/{len(runs)}] {label}: " + " ".join(f"{k}={v:.2f}" for k, v in shown.items()) +
              f", {r['learnable_parameters']:,} learnable parameters, {r['train_wall_s']:.1f}s ===", flush=True)
    return out


def _report(args, methods, seeds, model_name, device, note, sets, runs, out: Path) -> Dict[str, Any]:
    first = next(iter(sets.values()))
    b2n = args.protocol == "base2novel"
    report = {
        "task": args.task, "protocol": args.protocol, "data": first[3], "split": first[2], "device": str(device),
        "note": note, "main_metric": "hm" if b2n else MAIN_METRIC[args.task],
        "shown": list(B2N_KEYS) if b2n else list(SHOWN[args.task]),
        "plotted": list(B2N_KEYS) if b2n else [MAIN_METRIC[args.task]],
        "config": {"methods": methods, "seeds": seeds, "max_steps": args.max_steps, "model": model_name,
                   "pretrained": args.pretrained, "batch_size": args.batch_size, "lr": args.lr,
                   "weight_decay": args.weight_decay, "precision": args.precision, "k_shot": args.k_shot,
                   "shots": sorted({r["shots"] for rs in runs.values() for r in rs}) if args.protocol == "few-shot"
                   else None, "bench_batch": args.bench_batch, "bench_iters": args.bench_iters,
                   "train_args": args.train_args, "method_args": method_args(args),
                   "train_data": args.data or "embedded demo set"},
        "peak_rss_mb": peak_rss_mb(), "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else
        "n/a on CPU (see peak_rss_mb: this process's peak RSS over the whole comparison)",
        "files": {"md": str(out / "comparison.md"), "json": str(out / "comparison.json"),
                  "png": str(out / "comparison.png")},
    }
    if b2n:
        report["classes"] = {name: list(data[1]) for name, data in sets.items()}
    summary = summarise_by_shots if args.protocol == "few-shot" else summarise
    report["methods"] = summary(runs, args.task)
    if b2n:  # the harmonic mean of the mean accuracies, as CoCoOp's tables give it; std over seeds kept
        for m in report["methods"].values():
            base, novel = m["metrics"]["base"]["mean"], m["metrics"]["novel"]["mean"]
            m["metrics"]["hm"]["mean"] = harmonic_mean(base, novel)
    return report


def compare(args) -> Dict[str, Any]:
    methods, seeds = _methods(args), _seeds(args.seeds)
    methods = check_protocol(args, methods, chosen_by_user=bool(args.methods))
    unknown = sorted(set(method_args(args)) - set(methods))
    if unknown:
        raise UserError(f"--method-args for {unknown}, which are not among --methods {methods}")
    with user_errors():
        for m in methods:
            check_task(m, args.task)
    device = resolve_device(args.device)
    EV.check_templates(args.templates)
    check_out_dir(args.out)
    model_name = args.model or EV.default_model_name(args.pretrained)
    check_backbone(model_name, args.pretrained)
    out = Path(args.out)
    runs = plan(args, methods, seeds, out)
    _check_earlier_runs(runs, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    note = _pipeline_note(args, model_name)
    if note:
        print(f"NOTE: {note}", flush=True)
    sets = eval_sets(args)
    _check_training_data(args, runs[0], model_name, sets)
    results = _run_all(args, runs, model_name, device, sets)
    report = _report(args, methods, seeds, model_name, device, note, sets, results, out)
    md = write_report(report, out)
    print("\n" + md)
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}", flush=True)
    return report
