"""Evaluate NEARL-CLIP: image-text retrieval Recall@1/5/10 and prompt-based classification.

    python -m nearl.evaluate --checkpoint runs/demo                # a trained run (its last.pt)
    python -m nearl.evaluate --checkpoint runs/demo/best.pt --data test.csv --out results/
    python -m nearl.evaluate --adapter adapters/demo --data test.csv   # a folder of python -m nearl.export
    python -m nearl.evaluate --model ViT-B-16 --pretrained openai --task classification \\
        --data split.json --root images/                          # zero-shot: the frozen CLIP

Without --checkpoint the model is freshly built, which computes exactly the frozen CLIP (W_up
starts at zero), i.e. the zero-shot baseline (`--method zeroshot` says so by name). A checkpoint
records its method (nearl, alta, clip-adapter, coop, linear-probe, zeroshot: nearl/methods/), and
the same method is rebuilt from it. Without --data the embedded demo set is used.
Results go to stdout as a Markdown table and, with --out DIR, to DIR/results.json and
DIR/results.md. A checkpoint records the images it was trained on: evaluating on some of them is
refused unless --allow-train-data (then the table says how many).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .adapter_files import adapter_to_evaluate, read_adapter_config
from .argtypes import Parser, non_negative_int, positive_int, seed
from .checkpoint import load_checkpoint
from .classify import TEMPLATES
from .cli_args import add_model_source, check_out_dir, resolve_device
from .errors import run_cli
from .evaluation import (check_templates, check_training_overlap, evaluate_classification, evaluate_retrieval,
                         load_eval_data, model_to_evaluate)
from .logging_utils import json_safe, markdown_table
from .writes import atomic_write_all


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m nearl.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(p)
    p.add_argument("--fused", action="store_true", help="Triton kernels (CUDA only; falls back otherwise)")
    p.add_argument("--task", choices=("retrieval", "classification"),
                   help="default: the checkpoint's task, else retrieval")
    p.add_argument("--data", help="retrieval: manifest/ROCO/MedICaT; classification: ImageFolder dir or "
                   "CoOp split .json (default: the embedded demo set)")
    p.add_argument("--format", default="auto", help="retrieval source format: auto|manifest|roco|medicat")
    p.add_argument("--root", help="image root (manifest / CoOp JSON)")
    p.add_argument("--split", default="test", help="split to evaluate (default test; falls back to val)")
    p.add_argument("--classes", choices=("all", "base", "novel"), default="all", help="classification: evaluate "
                   "on the base classes (the first half, CoOp's base-to-novel protocol), the novel ones, or all")
    p.add_argument("--templates", nargs="+", help="prompt templates with '{}' (default: nearl.classify.TEMPLATES)")
    p.add_argument("--allow-train-data", action="store_true", help="score images the checkpoint was trained on "
                   "(refused by default: the checkpoint records its training images), with a warning")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--seed", type=seed, default=0, help="builds a random backbone reproducibly (zero-shot)")
    p.add_argument("--out", help="directory for results.json and results.md")
    p.add_argument("--no-progress", action="store_true")
    return p




def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line; returns the report. User mistakes raise UserError (see cli())."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nearl").setLevel(logging.INFO)
    device = resolve_device(args.device)
    check_templates(args.templates)
    check_out_dir(args.out)
    fused = args.fused
    if fused and device.type != "cuda":
        print("--fused: the Triton kernels need a CUDA GPU; none here, so the reference PyTorch path runs.")
        fused = False

    task, recorded = _task(args)  # the data are read before any backbone weights are downloaded
    records, classnames, split, src = load_eval_data(task, args.data, fmt=args.format, root=args.root,
                                                     split=args.split, classes=args.classes)
    if args.adapter:  # an adapter folder: its own backbone (fingerprint checked), method and task
        chosen = adapter_to_evaluate(args.adapter, method=args.method, model_name=args.model,
                                     pretrained=args.pretrained, task=task, fused=fused)
    else:
        chosen = model_to_evaluate(recorded, method=args.method, model_name=args.model,
                                   pretrained=args.pretrained, task=task, seed=args.seed, fused=fused)
    model, method, task, source, label, ckpt = (chosen.model, chosen.method, chosen.task, chosen.source,
                                                chosen.label, chosen.checkpoint)
    model.to(device).eval()

    seen = 0 if ckpt is None else check_training_overlap(  # a checkpoint records its training images
        ckpt.get("train_images"), records, f"{src}, split {split}", f"images {ckpt['path']} was trained on",
        args.allow_train_data)
    kw = dict(device=device, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
              progress=not args.no_progress, source=src)
    if task == "retrieval":
        results = evaluate_retrieval(model, records, **kw)
    else:
        if ckpt is not None and ckpt.get("classnames") and list(ckpt["classnames"]) != list(classnames):
            print(f"note: the checkpoint was trained on classes {ckpt['classnames']}; evaluating on "
                  f"{classnames} by their prompts")
        results = evaluate_classification(model, records, classnames, templates=args.templates or TEMPLATES, **kw)

    report = {"task": task, "method": method, "data": src, "split": split, "classes": args.classes,
              "model": model.model_name,
              "pretrained": source, "learnable_parameters": model.num_trainable_parameters(),
              "checkpoint": ckpt["path"] if ckpt else None, "fused": fused, "metrics": results,
              "train_images_evaluated": seen}
    classes = "" if args.classes == "all" else f", {args.classes} classes"
    trained = f", {seen} of them training images" if seen else ""
    table = markdown_table({label: {k: v for k, v in results.items() if not k.startswith("n_") and k != "auc_classes"}},
                           title=f"{task} on {src} ({split}{classes}, {results.get('n_images')} images{trained})")
    print(table)
    if args.out:
        out = Path(args.out)
        document = json.dumps(json_safe(report), indent=2, default=str, allow_nan=False)  # NaN: null
        atomic_write_all({out / "results.json": document + "\n", out / "results.md": table})
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return report


def _task(args):
    """(the task evaluated, the checkpoint loaded or None), from the flags, the checkpoint or the
    adapter's config: known without building the model, so the data are checked first."""
    if args.adapter:
        return args.task or read_adapter_config(args.adapter)[1]["task"], None
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    return args.task or (ckpt.get("task") or "retrieval" if ckpt else "retrieval"), ckpt




def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.evaluate"))


if __name__ == "__main__":
    cli()
