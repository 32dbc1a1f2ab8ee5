"""Predict with a trained adapter, a checkpoint or the zero-shot CLIP (`nearl.evaluation.prediction` is the library).

    python -m nearl.predict --adapter adapters/cxr --images scans/ --classes "pneumonia,normal"
    python -m nearl.predict --checkpoint runs/roco --images a.png b.dcm --texts "a chest x-ray" "a CT slice"
    python -m nearl.predict --model ViT-B-16 --pretrained openai --images scans/ --texts-file captions.txt

--images takes files and folders (searched recursively for image files, DICOM included); an image
that cannot be read is reported and skipped. --classes prints, per image, the softmax over the
classes of the model's logits (prompt ensembling with --templates, else the templates the model
was trained with, else nearl.model.classify.TEMPLATES); without --classes, an adapter or checkpoint
trained for classification scores its own classes. --multilabel scores each class on its own (multi-label,
as `nearl.evaluate --task multilabel`): per image and class the probability sigmoid(z_c) of its positive
against its negative prompts, and 1 where it is at least 0.5 (else 0); an adapter or checkpoint trained with
--task multilabel predicts this way by default. --texts / --texts-file rank the texts for each
image. --out DIR writes DIR/predictions.csv and DIR/predictions.json. An image whose outputs hold
NaN or inf (a diverged model) gets no prediction (null in the JSON), and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Optional, Sequence

from nearl.argtypes import Parser, non_negative_int, positive_int, seed
from nearl.cli_args import add_model_source, check_out_dir, resolve_device, use_fused, user_errors
from nearl.errors import UserError, run_cli
from nearl.logging_utils import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m nearl.predict", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and folders (searched recursively)")
    p.add_argument("--classes", nargs="+", help='class names, comma-separated: "pneumonia,normal"')
    p.add_argument("--multilabel", action="store_true", help="each class on its own: its probability and 0/1 at "
                   "0.5 (default for a model trained with --task multilabel)")
    p.add_argument("--texts", nargs="+", help="texts to rank for each image")
    p.add_argument("--texts-file", help="texts to rank, one a line")
    p.add_argument("--templates", nargs="+", help="prompt templates with '{}' (default: the model's, else "
                   "nearl.model.classify.TEMPLATES)")
    p.add_argument("--top-k", type=positive_int, default=5, help="texts (or classes, when many) shown per image")
    p.add_argument("--out", help="folder for predictions.csv and predictions.json")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=non_negative_int, default=2)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--fused", action="store_true", help="Triton kernels (CUDA only; falls back otherwise)")
    p.add_argument("--seed", type=seed, default=0, help="builds a random backbone reproducibly (zero-shot)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line; returns the report. User mistakes raise UserError (see cli())."""
    args = build_parser().parse_args(argv)
    # torch, the backbones and the image readers: imported after the parse (--help needs none of them)
    from nearl.store.adapter_files import adapter_to_evaluate
    from nearl.model.classify import TEMPLATES
    from nearl.evaluation.run import check_templates, model_to_evaluate
    from nearl.methods import check_task
    from nearl.store.nonfinite import NonFiniteError
    from nearl.evaluation.prediction import (find_images, format_table, predict_classes, rank_texts, read_texts, resolve_classes,
                             split_classes, write_predictions)

    setup_logging()
    device = resolve_device(args.device)
    check_templates(args.templates)
    check_out_dir(args.out)
    texts = read_texts(args.texts, args.texts_file)
    if texts is not None and args.classes is not None:
        raise UserError("give --classes (classification) or --texts / --texts-file (retrieval), not both")
    if texts is not None and args.multilabel:
        raise UserError("--multilabel scores --classes (or the model's own), not --texts / --texts-file")
    classes = split_classes(args.classes) if args.classes is not None else None
    if texts is None and classes is None and not (args.adapter or args.checkpoint):
        raise UserError("give --classes (classification) or --texts / --texts-file (retrieval)")
    images = find_images(args.images)
    fused = use_fused(args.fused, device)
    task = "retrieval" if texts is not None else "multilabel" if args.multilabel else None
    if task is None and not (args.adapter or args.checkpoint):
        task = "classification"
    common = dict(method=args.method, model_name=args.model, pretrained=args.pretrained, task=task, fused=fused)
    chosen = (adapter_to_evaluate(args.adapter, **common) if args.adapter else
              model_to_evaluate(args.checkpoint, seed=args.seed, **common))
    if task is None:  # classes to score: multi-label for a model trained so, else one of them
        task = "multilabel" if chosen.task == "multilabel" else "classification"
        with user_errors():
            check_task(chosen.method, task)
    model, record = chosen.model.to(device).eval(), chosen.checkpoint or {}
    kw = dict(device=device, batch_size=args.batch_size, workers=args.workers, precision=args.precision,
              progress=not args.no_progress)
    meta = {"method": chosen.method, "model": model.model_name, "pretrained": chosen.source,
            "adapter": args.adapter, "checkpoint": record.get("path")}
    if task != "retrieval":
        classes = resolve_classes(classes, record.get("classnames"), chosen.method, multilabel=task == "multilabel")
        meta["templates"] = list(args.templates or record.get("templates") or TEMPLATES)
        pred = predict_classes(model, images, classes, templates=meta["templates"], multilabel=task == "multilabel",
                               **kw)
    else:
        pred = rank_texts(model, images, texts, **kw)
    print(format_table(pred, top_k=args.top_k))
    if pred.skipped:
        print(f"skipped {len(pred.skipped)} image(s) that could not be read: "
              + ", ".join(f"{image} ({why})" for image, why in pred.skipped))
    if args.out:
        paths = write_predictions(pred, args.out, meta)
        print(f"wrote {paths[0]} and {paths[1]}")
    if pred.nonfinite:  # a diverged model: an image without a label is no result
        raise NonFiniteError(f"{len(pred.nonfinite)} of {len(pred.images)} images got no prediction: the model's "
                             f"outputs hold NaN or inf ({args.adapter or record.get('path') or 'the model'} has "
                             "diverged?). Use an earlier checkpoint, or train again with a lower --lr")
    return {**meta, "task": task, "predictions": pred}


def cli() -> None:
    """Console entry point: a user's mistake is one line on stderr and exit status 2."""
    sys.exit(run_cli(main, sys.argv[1:], prog="nearl.predict"))


if __name__ == "__main__":
    cli()
