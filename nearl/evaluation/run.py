"""Evaluation, the library: image-text retrieval Recall@1/5/10 and prompt-based classification,
the encoders they run on, the evaluation data a source holds, and a whole evaluation from its
EvalConfig (`evaluate`; `nearl.evaluate` is its command line)."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset
from torch import nn
from tqdm.auto import tqdm

from nearl.evaluation import class_report as CR, metrics as M
from nearl.store.checkpoint import describe, load_checkpoint
from nearl.model.classify import TEMPLATES, classification_logits
from nearl.cli_args import check_backbone, check_out_dir, resolve_device, use_fused, user_errors
from nearl.data import selection as S
from nearl.data.datasets import ImageTextDataset, LabelledDataset, SkipsBadImages
from nearl.data.labelled import require_classes, select_classes
from nearl.data.loadable import describe_failures, report_skips, require_loadable
from nearl.data.overlap import has_content, trained_on
from nearl.data.records import ImageTextRecord, LabelledRecord
from nearl.data.splitting import HeldOut, run_held_out
from nearl.data.tabular import Columns
from nearl.errors import UserError
from nearl.evaluation.config import EvalConfig
from nearl.logging_utils import json_safe, markdown_table, reporter
from nearl.methods import DEFAULT_METHOD, build_from_checkpoint, build_method, canonical, check_task, spec
from nearl.evaluation.metric_table import MAIN_METRIC
from nearl.towers.sources import parse
from nearl.writes import atomic_write_all

logger = logging.getLogger("nearl.evaluate")  # the name its messages have always carried
to_user = reporter("evaluate")  # the lines the user reads (nearl.logging_utils.reporter)

VAL_SPLITS = S.VAL_SPLITS  # the two names of the validation split (nearl.data.selection)


# ----------------------------------------------------------------------------- helpers
def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Indexed(Dataset):
    """(index, item) pairs, so the records whose image failed to load can be told apart."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        return None if item is None else (i, item[0])


def _collate_indexed(batch):
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return torch.tensor([b[0] for b in kept]), torch.stack([b[1] for b in kept])


@torch.no_grad()
def encode_images(model, dataset: Dataset, *, device, batch_size: int = 64, workers: int = 0,
                  precision: str = "fp32", progress: bool = True, desc: str = "images",
                  source: Optional[str] = None, what: str = "evaluation"
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept record indices, (n, E) float32 image features) for a dataset yielding (image, ...).

    For a dataset of nearl.data.datasets: a UserError naming `source` (the data file) and the first
    images when none of them loads, and one log line counting by reason those that did not load.
    """
    counted = isinstance(dataset, SkipsBadImages)
    if counted:
        require_loadable(dataset, source, what=what)  # stops at the first image that loads
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate_indexed, pin_memory=torch.device(device).type == "cuda")
    idx, feats = [], []
    for batch in tqdm(loader, desc=f"encoding {desc}", disable=not progress, leave=False):
        if batch is None:
            continue
        i, images = batch
        with autocast(torch.device(device), precision):
            feats.append(model.encode_image(images.to(device, non_blocking=True)).float().cpu())
        idx.append(i)
    if not idx:
        if counted:
            raise UserError(describe_failures(dataset, dataset.failed(), what, source))
        raise UserError(f"{source or 'the ' + what + ' set'}: none of its {len(dataset)} images could be loaded")
    if counted:
        report_skips(dataset, source=source, what=what)
    return torch.cat(idx), torch.cat(feats)


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, *, device, batch_size: int = 256, precision: str = "fp32",
                 progress: bool = True) -> torch.Tensor:
    out = []
    for s in tqdm(range(0, tokens.shape[0], batch_size), desc="encoding texts", disable=not progress,
                  leave=False):
        with autocast(torch.device(device), precision):
            out.append(model.encode_text(tokens[s:s + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def _eval_mode(model):
    was_training = model.training
    model.eval()
    return was_training


# ----------------------------------------------------------------------------- the two tasks
def evaluate_retrieval(model, records: Sequence[ImageTextRecord], *, device, batch_size: int = 64,
                       workers: int = 0, precision: str = "fp32", progress: bool = True,
                       source: Optional[str] = None) -> Dict[str, float]:
    """Recall@1/5/10 both ways; every caption of every record counts (several per image).
    `source` (the data file) is named in the messages about images that cannot be loaded."""
    was_training = _eval_mode(model)
    try:
        tokenizer = model.tokenizer()
        ds = ImageTextDataset(records, model.image_transform(False), tokenizer, train=False)
        kept, image_feats = encode_images(model, ds, device=device, batch_size=batch_size, workers=workers,
                                          precision=precision, progress=progress, source=source)
        texts, owners = ds.captions()
        # Drop the captions of images that could not be loaded; renumber owners to kept rows.
        row = torch.full((len(ds),), -1, dtype=torch.long)
        row[kept] = torch.arange(kept.numel())
        keep_text = row[owners] >= 0
        texts = [t for t, k in zip(texts, keep_text.tolist()) if k]
        text_feats = encode_texts(model, tokenizer(texts), device=device, batch_size=max(batch_size, 64),
                                  precision=precision, progress=progress)
        out = M.retrieval_recall(image_feats, text_feats, row[owners][keep_text])
        out["n_images"], out["n_texts"], out["n_skipped"] = int(kept.numel()), len(texts), ds.bad_count
        return out
    finally:
        model.train(was_training)


def evaluate_classification(model, records: Sequence[LabelledRecord], classnames: Sequence[str], *,
                            templates: Sequence[str] = TEMPLATES, device, batch_size: int = 64,
                            workers: int = 0, precision: str = "fp32", progress: bool = True,
                            source: Optional[str] = None, details: bool = False, bootstrap: int = 0,
                            seed: int = 0) -> Dict[str, Any]:
    """The metrics of nearl/evaluation/metrics.py (accuracy, macro-F1, macro-AUC, balanced accuracy, ...)
    of logit_scale * cos(image, prompt-ensembled class). `source` (the data file) is named in the
    messages about images that cannot be loaded. With `details` (nearl.evaluate; training's validation
    asks for none of it), also "details": per class, the confusion matrix and the reliability bins
    (metrics.classification_details) and, with `bootstrap` resamples drawn from `seed`, "ci95"
    (metrics.bootstrap_ci), all from the logits computed once."""
    ds = LabelledDataset(records, model.image_transform(False))
    kept, labels, logits = scored_images(
        model, ds, lambda feats: classification_logits(model, feats, classnames, templates, device=device),
        device=device, batch_size=batch_size, workers=workers, precision=precision, progress=progress, source=source)
    out = M.classification_metrics(logits, labels)
    out["n_images"], out["n_skipped"], out["n_classes"] = int(kept.numel()), ds.bad_count, len(classnames)
    if details:
        out["details"] = M.classification_details(logits, labels, classnames)
        if bootstrap:
            out["details"]["ci95"] = M.bootstrap_ci(logits, labels, resamples=bootstrap, seed=seed)
    return out


def scored_images(model, dataset, score: Callable[[torch.Tensor], torch.Tensor], *, device, batch_size: int,
                  workers: int, precision: str, progress: bool, source: Optional[str]):
    """(the rows of `dataset`'s decodable images, their labels, score(their image features) under
    autocast), in eval mode: classification's logits and multi-label's per-class z_c alike."""
    was_training = _eval_mode(model)
    try:
        kept, image_feats = encode_images(model, dataset, device=device, batch_size=batch_size, workers=workers,
                                          precision=precision, progress=progress, source=source)
        with autocast(torch.device(device), precision):
            scores = score(image_feats)
        return kept, dataset.labels()[kept], scores
    finally:
        model.train(was_training)


def headline(task: str, results: Dict[str, float], metric: Optional[str] = None) -> float:
    """The score best.pt is chosen by: `metric` (nearl.train --monitor), else the task's main metric
    (nearl/evaluation/metric_table.py, which says whether higher or lower is better: metric_table.better)."""
    return float(results[metric or MAIN_METRIC[task]])


# ----------------------------------------------------------------------------- data selection
def load_eval_data(task: str, data: Optional[str], *, fmt: str = "auto", root: Optional[str] = None,
                   split: str = "test", classes: str = "all", columns: Optional[Columns] = None,
                   held_out: Optional[HeldOut] = None):
    """(records, classnames or None, split actually used, source description); classification keeps
    the `classes` of CoOp's base-to-novel split ("base", "novel") or all of them. The split and its
    fallbacks: nearl.data.selection's EVALUATION rule, on a run's held-out lists when `held_out` holds
    them (nearl.data.splitting.run_held_out); `columns`: the column flags (--image-column, ...)."""
    if task != "retrieval":
        [chosen] = S.select_splits(task, data, (split,), root=root, fallback=S.EVALUATION, columns=columns,
                                   held_out=held_out)
        require_classes(chosen.classnames, chosen.source)
        records, classnames = select_classes(chosen.records, chosen.classnames, classes)
        return records, classnames, chosen.split, chosen.source
    if classes != "all":
        raise UserError("--classes applies to --task classification only")
    [chosen] = S.select_splits(task, Path(data) if data else None, (split,), fmt=fmt, root=root,
                               fallback=S.EVALUATION, columns=columns,
                               held_out=held_out)  # the data named as a Path: "./d.csv" is "d.csv"
    return chosen.records, None, chosen.split, chosen.source


def check_training_overlap(recorded: Optional[Dict[str, Any]], records: Sequence[Any], where: str, trained: str,
                           allow: bool, record_of: Optional[str] = None, progress: bool = True) -> int:
    """How many of the evaluated records are images the model was trained on (`recorded`: a checkpoint's
    `train_images`, by path and content, or an adapter's, by content). Some, without `allow`
    (--allow-train-data): a UserError, since their scores measure memory, not generalisation; with it,
    a warning. `where` names the evaluated data, and `trained` ends the sentence "N of the M images
    evaluated are ...": what they were trained by. `record_of`: the file the record comes from, named
    in one line when it holds none (written before the record) or paths only (copies go unseen).
    `progress`: the bar of hashing a large set's images."""
    if record_of and not recorded:
        to_user.warning(f"cannot check overlap with training data: {record_of} predates the record")
    elif record_of and not has_content(recorded):
        to_user.warning(f"overlap with training data checked by path only: {record_of} predates the content record "
                        "(copies of its training images elsewhere are not caught)")
    n = trained_on(records, recorded, progress)
    if n and not allow:
        raise UserError(f"{n} of the {len(records)} images evaluated ({where}) are {trained}: their scores would "
                        "measure memory, not generalisation. Evaluate on held-out images (another --split or "
                        "--data), or pass --allow-train-data to score them anyway")
    if n:
        to_user.warning(f"WARNING: {n} of the {len(records)} images evaluated ({where}) are {trained} "
                        "(--allow-train-data): the scores include them")
    return n


def default_model_name(pretrained: Optional[str] = None) -> str:
    """The architecture when --model is not given: the one an hf-hub:/local-dir: source names;
    ViT-B-16 when pretrained weights are asked for or a GPU is present; else the CPU-sized
    NEARL-Tiny (a random backbone that runs the demo in seconds)."""
    if parse(pretrained).kind in ("hf-hub", "local-dir"):
        return pretrained
    if pretrained or torch.cuda.is_available():
        return "ViT-B-16"
    return "NEARL-Tiny"


def check_templates(templates: Optional[Sequence[str]]) -> None:
    """--templates: each needs one '{}' for the class name (else every class gets the same prompt)."""
    bad = [t for t in templates or () if t.count("{}") != 1]
    if bad:
        raise UserError(f"--templates: each template needs exactly one '{{}}' for the class name, got {bad}")


@dataclass
class ModelToEvaluate:
    model: nn.Module
    method: str
    task: str
    source: Optional[str]  # the backbone's weights (None: random)
    label: str  # the results table's row name
    checkpoint: Optional[Dict[str, Any]]


def model_to_evaluate(checkpoint: Union[None, str, Dict[str, Any]], *, method: Optional[str] = None,
                      model_name: Optional[str] = None, pretrained: Optional[str] = None, task: Optional[str] = None,
                      seed: int = 0, fused: bool = False) -> ModelToEvaluate:
    """The model `python -m nearl.evaluate` evaluates: the one a checkpoint (file or run folder, or
    one already loaded) describes (`method`, when given, must match it; `model_name` / `pretrained`
    override its backbone), or without one a fresh model of `method` (nearl: the frozen CLIP). What
    was chosen is said once; a mismatch is a UserError."""
    method_arg, task_arg = method, task
    if checkpoint:
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        with user_errors(f"checkpoint {ckpt['path']}: "):
            method = canonical(ckpt.get("method") or DEFAULT_METHOD)
        if method_arg:
            with user_errors("--method: "):
                wanted = canonical(method_arg)
            if wanted != method:
                raise UserError(f"--method {method_arg} but the checkpoint {ckpt['path']} holds method {method!r}")
        to_user.info(f"checkpoint {describe(ckpt)}{f', method {method}' if spec(method).named_in_messages else ''}")
        chosen = pretrained if pretrained is not None else "checkpoint"
        source = ckpt.get("pretrained") if chosen == "checkpoint" else chosen
        if model_name or pretrained is not None:
            check_backbone(model_name or ckpt.get("model_name") or "", source)
        with user_errors(f"checkpoint {ckpt['path']} does not fit the model asked for: "):
            model = build_from_checkpoint(ckpt, fused=fused, pretrained=chosen, model_name=model_name)
        task = task_arg or ckpt.get("task", "retrieval")
        label = f"{spec(method).display_name} ({Path(ckpt['path']).name}, step {ckpt.get('step')})"
    else:
        ckpt = None
        with user_errors("--method: "):
            method = canonical(method_arg or DEFAULT_METHOD)
        name = model_name or default_model_name(pretrained)
        check_backbone(name, pretrained)
        model = build_method(method, name, pretrained, fused=fused, seed=seed)
        task = task_arg or "retrieval"
        source = pretrained
        zero_shot = spec(method).untrained_is_zero_shot  # a fresh model of it is the frozen CLIP
        label = f"zero-shot {name}" if zero_shot else f"{method} {name} (untrained)"
        if not zero_shot:
            to_user.warning(f"NOTE: --method {method} without --checkpoint evaluates an UNTRAINED {method} model")
    with user_errors():
        check_task(method, task)
    if source is None:
        shown = seed if ckpt is None else ckpt.get("backbone_seed")
        to_user.warning(f"NOTE: no pretrained weights: the backbone is RANDOM (seed {shown}); numbers only check the "
                        "pipeline.")
    return ModelToEvaluate(model, method, task, source, label, ckpt)


# ----------------------------------------------------------------------------- a whole evaluation
def evaluate(config: EvalConfig) -> Dict[str, Any]:
    """What `python -m nearl.evaluate` does, from its EvalConfig: read the data, rebuild the model
    (a checkpoint, an adapter, or a fresh one: zero-shot), score it, print the table and, with `out`,
    write results.json and results.md. Returns the report; a user's mistake raises UserError."""
    if not isinstance(config, EvalConfig):
        raise TypeError(f"evaluate takes an EvalConfig (nearl.evaluation.config), got {type(config).__name__}")
    device = resolve_device(config.device)
    check_templates(config.templates)
    check_out_dir(config.out)
    fused = use_fused(config.fused, device)
    task, recorded, adapter = _task(config)  # the data are read before any backbone weights are downloaded
    config = _with_uncertain_rule(config, task, recorded)
    held = run_held_out(Path(recorded["path"]).parent, config.data) if recorded else None  # the run's splits.json
    records, classnames, split, src = load_eval_data(task, config.data, fmt=config.format, root=config.root,
                                                     split=config.split, classes=config.classes,
                                                     columns=Columns.of(config), held_out=held)
    chosen = _chosen_model(config, task, recorded, adapter, fused)
    model, method, task, source, label, ckpt = (chosen.model, chosen.method, chosen.task, chosen.source,
                                                chosen.label, chosen.checkpoint)
    model.to(device).eval()

    seen = 0 if ckpt is None else check_training_overlap(  # a checkpoint (or adapter) records its training images
        ckpt.get("train_images"), records, f"{src}, split {split}", f"images {ckpt['path']} was trained on",
        config.allow_train_data, record_of=ckpt.get("train_images_file") or ckpt["path"],
        progress=not config.no_progress)
    kw = dict(device=device, batch_size=config.batch_size, workers=config.workers, precision=config.precision,
              progress=not config.no_progress, source=src)
    if task == "retrieval":
        results = evaluate_retrieval(model, records, **kw)
    elif task == "multilabel":  # per-class AUROC of positive vs negative prompts (nearl/evaluation/multilabel.py)
        from nearl.evaluation.multilabel import evaluate_multilabel
        trained = ((ckpt or {}).get("args") or {}).get("uncertain_labels")
        if trained and trained != config.uncertain_labels:  # only when given on the command line
            to_user.warning(f"note: {ckpt['path']} was trained with --uncertain-labels {trained}; these targets read "
                            f"-1 cells as --uncertain-labels {config.uncertain_labels}")
        results = evaluate_multilabel(model, records, classnames, templates=config.templates or TEMPLATES,
                                      details=True, bootstrap=config.bootstrap, seed=config.seed,
                                      uncertain=config.uncertain_labels, **kw)
    else:
        if ckpt is not None and ckpt.get("classnames") and list(ckpt["classnames"]) != list(classnames):
            to_user.warning(f"note: the checkpoint was trained on classes {ckpt['classnames']}; evaluating on "
                            f"{classnames} by their prompts")
        results = evaluate_classification(model, records, classnames, templates=config.templates or TEMPLATES,
                                          details=True, bootstrap=config.bootstrap, seed=config.seed, **kw)
    details = results.pop("details", None)

    report = {"task": task, "method": method, "data": src, "split": split, "classes": config.classes,
              "model": model.model_name,
              "pretrained": source, "learnable_parameters": model.num_trainable_parameters(),
              "checkpoint": ckpt["path"] if ckpt else None, "fused": fused, "metrics": results,
              "train_images_evaluated": seen}
    if details is not None:  # per class, the confusion matrix, calibration, the intervals, the rules stated
        report.update(_report_parts(task).report_block(details, config.bootstrap, config.seed))
    _show_and_write(report, label, seen, config.out)
    return report


def _chosen_model(config: EvalConfig, task: str, recorded, adapter: Optional[Path], fused: bool) -> ModelToEvaluate:
    from nearl.store.adapter_files import adapter_to_evaluate  # it imports this module

    if adapter is not None:  # an adapter folder: its own backbone (fingerprint checked), method and task
        return adapter_to_evaluate(adapter, method=config.method, model_name=config.model,
                                   pretrained=config.pretrained, task=task, fused=fused)
    return model_to_evaluate(recorded, method=config.method, model_name=config.model,
                             pretrained=config.pretrained, task=task, seed=config.seed, fused=fused)


def _show_and_write(report: Dict[str, Any], label: str, seen: int, out: Optional[str]) -> None:
    """The Markdown table on stdout and, with `out`, results.json and results.md there."""
    results, classes = report["metrics"], report["classes"]
    shown = "" if classes == "all" else f", {classes} classes"
    trained = f", {seen} of them training images" if seen else ""
    scores = {k: v for k, v in results.items() if not k.startswith("n_") and k not in ("auc_classes", "auroc_classes")}
    rows = {label: scores, **({"95% CI": CR.ci_row(scores, report["ci95"])} if report.get("ci95") else {})}
    table = markdown_table(rows, title=f"{report['task']} on {report['data']} ({report['split']}{shown}, "
                                       f"{results.get('n_images')} images{trained})")
    parts = _report_parts(report["task"]) if "per_class" in report else None
    if parts is not None:
        table += "\n" + parts.markdown(report)
    to_user.info(table)
    if out:
        out = Path(out)
        if parts is not None:  # the figures first: results.json names them
            report["figures"] = parts.write_figures(report, out, label)
        document = json.dumps(json_safe(report), indent=2, default=str, allow_nan=False)  # NaN: null
        atomic_write_all({out / "results.json": document + "\n", out / "results.md": table})
        written = [str(out / "results.json"), str(out / "results.md"), *report.get("figures", {}).values()]
        to_user.info(f"wrote {', '.join(written[:-1])} and {written[-1]}")


def _report_parts(task: str):
    """The module that makes `task`'s report block, notes, tables and figures: class_report for
    classification, nearl.evaluation.multilabel (which reuses class_report's pieces) for multilabel."""
    if task == "multilabel":
        from nearl.evaluation import multilabel  # it imports this module
        return multilabel
    return CR


def _with_uncertain_rule(config: EvalConfig, task: str, recorded: Optional[dict]) -> EvalConfig:
    """--uncertain-labels not given: the checkpoint's rule for a multi-label evaluation, else zeros (for other
    tasks it stays unset, so it is not taken for a multi-label flag given by mistake)."""
    if config.uncertain_labels is not None or task != "multilabel":
        return config
    trained = ((recorded or {}).get("args") or {}).get("uncertain_labels")
    return dataclasses.replace(config, uncertain_labels=trained or "zeros")


def _task(config: EvalConfig):
    """(the task evaluated, the checkpoint loaded or None, the adapter's folder on this machine or None),
    from the config, the checkpoint or the adapter's config: known without building the model, so the
    data are checked first. An hf-hub: adapter is downloaded here, once."""
    from nearl.store.adapter_files import read_adapter_config  # it imports this module

    if config.adapter:
        folder, record = read_adapter_config(config.adapter)
        return config.task or record["task"], None, folder
    ckpt = load_checkpoint(config.checkpoint) if config.checkpoint else None
    return config.task or (ckpt.get("task") or "retrieval" if ckpt else "retrieval"), ckpt, None
