"""The model card of an adapter folder (README.md), and what a checkpoint says of its data and validation.

`run_record(ckpt)` reads, from a checkpoint (and the metrics.jsonl beside it, when it lies in its run
folder), what the card reports: the training data by name and count (never a path) and the main
validation metric of the checkpoint's step and of the whole run. `python -m nearl.export` writes it into
adapter_config.json's `source` (for people only, as the rest of `source`), and `model_card(record)`
turns an adapter_config.json into README.md for the Hugging Face Hub:

    header        library_name, tags, base_model (the backbone's own Hub id: an hf-hub: or transformers:
                  repo, or the repo open_clip downloads a tag's weights from; none for a local or
                  random backbone), license (only when one was given: `--license`), metrics (the
                  validation metrics recorded)
    body          what the adapter is, its backbone, training data, validation (labelled as such, with
                  its protocol), how to load and predict with it (its own class names), intended use,
                  limitations, license
"""
from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

from nearl.evaluation.metric_table import MAIN_METRIC, VALIDATION_SHOWN
from nearl.logging_utils import read_metrics
from nearl.store.adapter_files import CONFIG_FILE, _model_name_used
from nearl.towers.sources import HF_HUB, names_local_path, parse

PLACEHOLDER_REPO = "owner/name"
SHOWN_CLASSES = 4  # class names the predict example names at most


# ----------------------------------------------------------------------------- what a run recorded
def _name(path: Optional[str]) -> Optional[str]:
    """A data source by its file or folder name alone (its path means nothing elsewhere)."""
    return Path(str(path)).name or None if path else None


def _finite(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: round(float(v), 4) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _step_metrics(ckpt: Dict[str, Any], metric: str) -> Dict[str, Any]:
    """The validation results of the checkpoint's own step: those it holds (best.pt and a final last.pt
    do), else the metrics.jsonl line of that step in its run folder; {} when neither has them."""
    if metric in (ckpt.get("metrics") or {}):
        return ckpt["metrics"]
    path = Path(str(ckpt.get("path", ""))).parent / "metrics.jsonl"
    lines = [r for r in read_metrics(path) if r.get("kind") == "val" and r.get("step") == ckpt.get("step")]
    return lines[-1] if lines and metric in lines[-1] else {}


def run_record(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """{"data": ..., "validation": ...} of a checkpoint, for adapter_config.json's `source`: names and
    counts, no path. validation is None when the run recorded none."""
    args, task = ckpt.get("args") or {}, ckpt.get("task") or "retrieval"
    data = {"name": _name(args.get("data")) or "nearl demo set",
            "train_records": (ckpt.get("data") or {}).get("n"), "k_shot": args.get("k_shot"),
            "classes": args.get("classes") if args.get("classes") not in (None, "all") else None,
            "val_data": _name(args.get("val_data"))}
    metric = MAIN_METRIC[task]
    found = _step_metrics(ckpt, metric)
    best = ckpt.get("best")
    best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None
    validation = None
    if found or best is not None:
        shown = _finite({k: v for k, v in found.items() if k in VALIDATION_SHOWN})
        validation = {"metric": metric, "split": "val-data" if data["val_data"] else "val",
                      "data": data["val_data"] or data["name"],
                      "step": ckpt.get("step") if found else None, "score": shown.get(metric),
                      "metrics": shown, "images": found.get("n_images"), "run_best": best,
                      "eval_every": args.get("eval_every")}
    return {"data": {k: v for k, v in data.items() if v is not None}, "validation": validation}


# ----------------------------------------------------------------------------- the card
def base_model(backbone: Dict[str, Any]) -> Optional[str]:
    """The Hub id of the backbone's weights: an hf-hub: or transformers: repo id, or the repo open_clip
    downloads a tag from (its pretrained config's hf_hub); None for random, local or unknown weights."""
    source = backbone.get("pretrained")
    if source is None or backbone.get("pretrained_local"):
        return None
    parsed = parse(source)
    if parsed.kind in ("hf-hub", "transformers"):
        return None if names_local_path(parsed.value) else parsed.value
    if parsed.kind != "tag":
        return None
    try:
        import open_clip

        hub = open_clip.get_pretrained_cfg(backbone["model_name"], source).get("hf_hub")
    except Exception:  # an architecture open_clip does not know: no id to name
        return None
    return "/".join(hub.strip("/").split("/")[:2]) if hub else None


def _header(record: Dict[str, Any], license: Optional[str]) -> List[str]:
    validation = (record.get("source") or {}).get("validation") or {}
    hub = base_model(record["backbone"])
    lines = ["---", "library_name: nearl-clip"]
    lines += [f"license: {json.dumps(license)}"] if license else []
    lines += [f"base_model: {json.dumps(hub)}"] if hub else []
    lines += ["tags:", "- nearl-clip", "- clip", "- adapter", "- medical", f"- {record['method']}",
              f"- {record['task']}"]
    names = list(validation.get("metrics") or {})
    lines += ["metrics:", *(f"- {n}" for n in names)] if names else []
    return lines + ["---"]


def _data_lines(record: Dict[str, Any]) -> List[str]:
    data = (record.get("source") or {}).get("data")
    images = record.get("train_images")
    counted = (f"- training images: {images['count']:,}, as hashes of their bytes in `{images['file']}` "
               "(`nearl.evaluate` refuses to score them)" if images else "- training images: not recorded")
    if not data:
        return ["## Training data", "", "- data: not recorded (saved from Python, not exported from a run)",
                counted, ""]
    extra = [f"k-shot {data['k_shot']}" if data.get("k_shot") else "",
             f"classes: {data['classes']}" if data.get("classes") else ""]
    records = f", {data['train_records']:,} training records" if data.get("train_records") else ""
    lines = ["## Training data", "", f"- data: `{data['name']}`{records}{''.join(f', {e}' for e in extra if e)} "
             "(named only: its path and contents are not included)", counted]
    if data.get("val_data"):
        lines.append(f"- validation data: `{data['val_data']}` (`--val-data`)")
    return lines + [""]


def _validation_lines(record: Dict[str, Any]) -> List[str]:
    source = record.get("source") or {}
    v, random = source.get("validation"), record["backbone"].get("pretrained") is None
    lines = ["## Validation", ""]
    if random:
        lines += ["The backbone is random (no pretrained weights): any score below is a pipeline check only, "
                  "not evidence that the adapter works.", ""]
    if not v:
        why = ("no validation split, or none before this checkpoint" if source.get("data") else
               "saved from Python, not exported from a run")
        return lines + [f"No validation was recorded ({why}): these weights have no recorded score.", ""]
    where = (f"`{v['data']}` (`--val-data`)" if v["split"] == "val-data" else
             f"the validation split (`{v['split']}`) of `{v['data']}`")
    every = {None: "", 0: "", 1: ", every epoch"}.get(v.get("eval_every"), f", every {v.get('eval_every')} epochs")
    lines.append(f"Protocol: scored during training on {where}{every}; `{v['metric']}` "
                 "is the metric `best.pt` is chosen by. Validation, not a test result: the data that chose the "
                 "checkpoint scored it, so the numbers are optimistic.")
    if v.get("metrics"):
        lines += ["", f"| metric (validation, step {v['step']}, {v.get('images') or '?'} images) | value |",
                  "|---|---|", *(f"| {k} | {x:.2f} |" for k, x in v["metrics"].items())]
    else:
        lines += ["", "No validation score of these weights' step is recorded."]
    if v.get("run_best") is not None and v.get("run_best") != v.get("score"):
        lines += ["", f"These weights are from step {source.get('step')} (`{source.get('checkpoint')}`); the run's "
                      f"best validation {v['metric']} was {v['run_best']:.2f} (`best.pt`)."]
    return lines + [""]


def _shell_quoted(text: str) -> str:
    return f'"{text}"' if not re.search(r'["$`\\!]', text) else shlex.quote(text)


def _predict_example(record: Dict[str, Any], ref: str) -> List[str]:
    """The predict command with the adapter's own class names (or, for retrieval, texts to rank)."""
    from nearl.methods import spec

    command = f"python -m nearl.predict --adapter {ref} --images scans/"
    if record["task"] == "retrieval":
        return [f'{command} --texts "a caption as the training data words them" "another caption"',
                "# this adapter records no texts: rank your own captions, written as its training captions are"]
    names = record.get("classnames") or []
    if not names:
        return [f'{command} --classes "<class 1>,<class 2>"', "# no class names recorded: give yours"]
    chosen = [n for n in names if "," not in n][:SHOWN_CLASSES] if spec(record["method"]).scores_unseen_classes \
        else list(names)
    lines = [f"{command}   # its {len(names)} classes: {', '.join(names[:SHOWN_CLASSES])}"
             f"{', ...' if len(names) > SHOWN_CLASSES else ''}"]
    if len(chosen) >= 2 and not any("," in n for n in chosen):
        lines.append(f"{command} --classes {_shell_quoted(','.join(chosen))}")
    return lines


def _use_lines(record: Dict[str, Any], repo_id: Optional[str]) -> List[str]:
    ref = HF_HUB + (repo_id or PLACEHOLDER_REPO)  # what nearl.load takes for a Hub repo
    named = "" if repo_id else "   # once pushed: python -m nearl.export ... --push-to-hub owner/name"
    return ["## Use", "", "```python", "import nearl", f'model = nearl.load("{ref}"){named}',
            f'model = nearl.from_pretrained("{repo_id or PLACEHOLDER_REPO}", revision="main")   # a branch, tag or '
            'commit', 'model = nearl.load("path/to/this/folder")   # a copy of this folder; refuses another backbone',
            "```",
            "", "```bash", *_predict_example(record, ref), "```", ""]


def _limitation_lines(record: Dict[str, Any], license: Optional[str]) -> List[str]:
    bb = record["backbone"]
    lines = ["## Intended use", "",
             "Research on adapting CLIP-style models to medical images and text: retrieval and classification "
             "experiments, and a starting point for evaluation on your own data. It is not a medical device: not "
             "for diagnosis, triage, treatment or any clinical decision, for which it has not been validated.", "",
             "## Limitations", "",
             "- Evaluated only on the data recorded above (validation during training); no test result is "
             "recorded here. Evaluate it on held-out data of your own (`python -m nearl.evaluate --adapter ... "
             "--data ...`) before relying on any number.",
             "- Domain shift: images from other scanners, sites, protocols, populations or modalities, and other "
             "label definitions or wording, than the training data's can lower its accuracy without warning; "
             "its scores are similarities, not calibrated probabilities.",
             f"- It inherits the frozen backbone's (`{bb['model_name']}`) limitations and biases, and those of "
             "its training labels or captions; class names it was not trained on are zero-shot guesses."]
    if bb.get("pretrained") is None:
        lines.append("- The backbone is random: this adapter is a pipeline check only and predicts nothing useful.")
    lines += ["", "## License", ""]
    if license:
        lines.append(f"This adapter: `{license}`, as stated when it was written.")
    else:
        lines.append("No license was stated when this adapter was exported (`python -m nearl.export --license`).")
    return lines + ["The backbone's license and the training data's terms apply to its use as well.", ""]


def card_backbone(bb: Dict[str, Any]) -> List[str]:
    """The model card's lines on the backbone: its name and weights, and how to give a local one."""
    source = bb["pretrained"]
    weights = f"`{source}`" if source else f"random (seed {bb['seed']}): this adapter only checks a pipeline"
    if bb.get("pretrained_local"):
        weights += " (a local copy, not included: `nearl.load(folder, pretrained=<its path>)`)"
    name = f"`{bb['model_name']}`"
    if bb.get("model_local") and _model_name_used(source):
        name += " (a local folder, not included: `nearl.load(folder, model=<its path>)`)"
    lines = [f"- backbone: {name}, weights {weights}",
             f"- backbone fingerprint ({bb['fingerprint']['algorithm']}): `{bb['fingerprint']['weights']}`"]
    for role, entry in (bb.get("local_sources") or {}).items():
        if entry.get("config_name_or_path"):
            lines.append(f"- the {role} folder's config names `{entry['config_name_or_path']}` (the weights may "
                         "differ: the fingerprint tells)")
        lines += [f"- {role} weights file `{f}`, sha256 `{d}`" for f, d in sorted((entry.get("files") or {}).items())]
    return lines


def model_card(record: Dict[str, Any], *, license: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """README.md for the Hub from an adapter_config.json's record (see the module docstring); repo_id:
    the Hub repository it is pushed to, which its examples name (else a placeholder)."""
    bb, method = record["backbone"], record["method"]
    body = [f"# {method} adapter for {bb['model_name']}", "",
            f"Learnable weights of a `{method}` model (NEARL-CLIP project) trained for {record['task']}, "
            f"{record['weights']['parameters']:,} parameters in `{record['weights']['file']}`; the frozen backbone "
            "is not included.", "", *card_backbone(bb),
            f"- classes: {', '.join(record['classnames']) if record.get('classnames') else 'none recorded'}",
            f"- hyper-parameters: `{CONFIG_FILE}` (`config`)", ""]
    return "\n".join([*_header(record, license), "", *body, *_data_lines(record), *_validation_lines(record),
                      *_use_lines(record, repo_id), *_limitation_lines(record, license)])
