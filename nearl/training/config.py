"""A training run's settings as one dataclass, `TrainConfig`: what `nearl.training.fit` takes.

    from nearl.training import fit, TrainConfig
    fit(TrainConfig(data="data.csv", out="runs/mine", max_steps=2))

Each field is one `python -m nearl.train` flag (`--max-steps` is `max_steps`) with its default; its
metadata holds the help text, the --help group and the argparse keywords, so the parser
(nearl/training/options.py) is built from these fields and the two cannot drift. The methods' own
options (nearl/methods/options.py) live in `method_options`, by dest; one not given takes its declared
default. Checkpoints record `to_dict()` (flat, the methods' options at the top level, as the
argparse Namespace was recorded), and `from_dict` reads that back, old checkpoints included.
Imports no torch: --help answers at once."""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from nearl import argtypes as A
from nearl.data.manifests import FORMATS
from nearl.errors import UserError
from nearl.evaluation import metric_table as MT
from nearl.methods.options import DEFAULT_METHOD, METHODS, canonical, options as method_option_table
from nearl.training.tracking import parse_report_to

AUTO = "auto"  # --resume auto


def _method(text: str) -> str:
    try:
        return canonical(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _report_to(text: str):
    try:
        return parse_report_to(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction(text: str) -> float:
    """--val-fraction / --test-fraction: a fraction in (0, 1)."""
    value = A.unit_interval(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value:g}")
    return value


def flag(default: Any, group: str, help: Optional[str] = None, aliases: tuple = (), **cli: Any) -> Any:
    """A field that is a command-line flag: its default, --help group, help, other names (`aliases`,
    e.g. open_clip's "--csv-img-key") and argparse keywords."""
    meta = {"help": help, "group": group, "cli": cli, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """The settings of a training run (`python -m nearl.train --help` says each one's meaning)."""
    # model
    method: str = flag(DEFAULT_METHOD, "model", "adaptation method: " + ", ".join(METHODS)
                       + f" (default {DEFAULT_METHOD}; see nearl/methods/)", type=_method)
    model: Optional[str] = flag(None, "model", "open_clip architecture, or transformers:<repo id or folder> for a "
                                "transformers CLIP-family model (default: ViT-B-16 with a GPU, NEARL-Tiny "
                                "on CPU)")
    pretrained: Optional[str] = flag(None, "model", "backbone weights: open_clip tag (openai, laion2b_s34b_b88k), a "
                                     "checkpoint file, hf-hub:org/repo, local-dir:path or transformers:<repo id or "
                                     "folder> (default: none = random backbone)")
    fused: bool = flag(False, "model", "Triton kernels (CUDA only; falls back otherwise)", action="store_true")
    grad_checkpointing: bool = flag(False, "model", "keep no activation inside the frozen blocks: the backward runs "
                                    "each again (less memory, about one more forward of the blocks). Free to change "
                                    "on --resume", action=argparse.BooleanOptionalAction)
    # data
    task: str = flag("retrieval", "data", choices=("retrieval", "classification", "multilabel"))
    data: Optional[str] = flag(None, "data", "retrieval: a manifest (CSV/TSV/JSONL), ROCO folder/CSV or MedICaT "
                               "JSONL; classification: an ImageFolder dir (with train/ val/ sub-dirs, or flat), a "
                               "CoOp split .json or a label CSV (image, label, optional split columns). Default: the "
                               "embedded demo set")
    val_data: Optional[str] = flag(None, "data", "a separate validation source (same kinds as --data)")
    format: str = flag("auto", "data", f"retrieval source format: {'|'.join(FORMATS)}")
    root: Optional[str] = flag(None, "data", "image root for a manifest, label CSV or CoOp JSON (default: the file's "
                               "folder)")
    image_column: Optional[str] = flag(None, "data", "a manifest's or label CSV's image column (default image)",
                                       aliases=("--csv-img-key",))
    caption_column: Optional[str] = flag(None, "data", "a manifest's caption column (default caption)",
                                         aliases=("--csv-caption-key",))
    label_column: Optional[str] = flag(None, "data", "a label CSV's class-name column (default label)")
    label_columns: Optional[str] = flag(None, "data", "multilabel: the finding columns, comma-separated (cells 1 "
                                        "positive; 0 or empty negative; -1 as --uncertain-labels says)")
    label_separator: Optional[str] = flag(None, "data", "multilabel: --label-column holds several findings split by "
                                          "this (e.g. '|'; 'No Finding' is none)")
    uncertain_labels: str = flag("zeros", "data", "multilabel: a --label-columns cell -1 (CheXpert's uncertain) is "
                                 "a negative (zeros, U-zeros) or a positive (ones, U-ones); default %(default)s",
                                 aliases=("--uncertain",), choices=A.UNCERTAIN_LABELS)
    separator: Optional[str] = flag(None, "data", "a CSV's separator: one character, or \\t / tab (default: comma "
                                    "for .csv, tab for .tsv)", aliases=("--csv-separator",))
    val_fraction: Optional[float] = flag(None, "data", "hold out this fraction of a source without splits (a flat "
                                         "ImageFolder, a manifest or label CSV without a split column) for "
                                         "validation: seeded by --seed, stratified by class; the lists go to "
                                         "--out/splits.json, which nearl.evaluate reuses", type=_fraction)
    test_fraction: Optional[float] = flag(None, "data", "likewise, a test split (nearl.evaluate --checkpoint RUN "
                                          "with the same --data evaluates on it)", type=_fraction)
    k_shot: Optional[int] = flag(None, "data", "classification: k training images per class", type=A.positive_int)
    classes: str = flag("all", "data", "classification: train on the base classes (the first half, CoOp's "
                        "base-to-novel protocol), the novel ones, or all (default)", choices=A.CLASS_SUBSETS)
    templates: Optional[List[str]] = flag(None, "data", "classification prompt templates with '{}'", nargs="+")
    seed: int = flag(0, "data", "data order, augmentation, init, few-shot draw", type=A.seed)
    # optimisation
    epochs: Optional[int] = flag(None, "optimisation", "default 10, or as many as --max-steps needs", type=A.steps)
    max_steps: Optional[int] = flag(None, "optimisation", "stop after this many optimizer steps (also the "
                                    "schedule's length when it ends before --epochs). Changed on --resume, the "
                                    "warmup + cosine is laid out again over the new length and the lr moves onto it "
                                    "linearly over max(1, warmup) steps, so it never jumps (a finished run warms up "
                                    "again from its floor)", type=A.steps)
    batch_size: int = flag(32, "optimisation", "per process; global = this x processes", type=A.positive_int)
    accum_steps: int = flag(1, "optimisation", "micro-batches per optimizer step", type=A.positive_int)
    lr: float = flag(1e-3, "optimisation", "peak learning rate (given again on --resume: applies from the next step)",
                     type=A.positive_float)
    weight_decay: float = flag(0.05, "optimisation", "on matrices only", type=A.non_negative_float)
    beta1: float = flag(0.9, "optimisation", type=A.adam_beta)
    beta2: float = flag(0.98, "optimisation", type=A.adam_beta)
    eps: float = flag(1e-6, "optimisation", type=A.positive_float)
    warmup: Optional[int] = flag(None, "optimisation", "warmup steps (default: 5%% of the run, at most 500)",
                                 type=A.non_negative_int)
    min_lr_ratio: float = flag(0.0, "optimisation", "cosine floor as a fraction of --lr", type=A.unit_interval)
    grad_clip: float = flag(1.0, "optimisation", "max global grad norm (0: off)", type=A.non_negative_float)
    precision: str = flag("fp32", "optimisation", "autocast dtype (fp16 adds a GradScaler)",
                          choices=("fp32", "bf16", "fp16"))
    skip_nonfinite: int = flag(0, "optimisation", "skip up to N optimizer steps whose loss or gradients are NaN/inf "
                               "(the parameters are left as they were; each is logged with its running count); one "
                               "more stops the run. Default 0: the first one stops it, and nothing of it is saved",
                               type=A.non_negative_int, metavar="N")
    # run
    out: str = flag("runs/nearl", "run", "output directory (default %(default)s). A folder that holds a run is "
                    "refused unless --resume continues it or --overwrite replaces it")
    resume: Optional[str] = flag(None, "run", "a run directory (its last.pt) or checkpoint file to continue from; "
                                 "arguments not given again are taken from the checkpoint, those given again take "
                                 "effect (the model's shape excepted: --model, --num-queries, ... stay the "
                                 "checkpoint's). 'auto': continue the run in --out if it has a checkpoint, else "
                                 "start one there (a requeued job runs the same command)")
    overwrite: bool = flag(False, "run", "start a new run in an --out that holds one, deleting its last.pt, "
                           "last.prev.pt, best.pt, metrics.jsonl, curves.png and config.yaml first", action="store_true")
    force_unlock: bool = flag(False, "run", "take over --out's train.lock even though it was written on another "
                              "host (whether that run still lives cannot be checked from here)", action="store_true")
    save_every: int = flag(0, "run", "also checkpoint every N steps (0: per epoch)", type=A.non_negative_int)
    eval_every: Optional[int] = flag(None, "run", "validate every N epochs (0: only at the end). Default: every "
                                     "epoch, or in a run of more than 20 epochs (few-shot) every ceil(epochs / 20), "
                                     "last.pt saved as often", type=A.non_negative_int)
    eval_batch_size: Optional[int] = flag(None, "run", "default: --batch-size", type=A.positive_int)
    monitor: Optional[str] = flag(None, "run", "the validation metric best.pt is chosen by, in its direction ("
                                  + ", ".join(m.name for m in MT.METRICS if not m.higher_is_better)
                                  + ": lower is better); default: the task's main metric. "
                                  + "; ".join(f"{task}: {', '.join(MT.names(task))}" for task in MT.TASKS),
                                  metavar="METRIC")
    workers: int = flag(2, "run", "DataLoader worker processes", type=A.non_negative_int)
    device: Optional[str] = flag(None, "run", "cpu | cuda | cuda:N (default: cuda when available)", type=A.device)
    no_progress: bool = flag(False, "run", "no tqdm bars", action="store_true")
    report_to: Optional[List[str]] = flag(None, "run", "also log metrics.jsonl's scalars to tensorboard "
                                          "(--out/tensorboard) and/or wandb (offline unless WANDB_MODE is set; "
                                          "--out/wandb): comma-separated or repeated; 'none' turns off what a resumed "
                                          "run had. Needs pip install tensorboard / wandb",
                                          type=_report_to, action="extend", metavar="TRACKERS")
    wandb_project: str = flag("nearl-clip", "run", "wandb project (default %(default)s); the run is named after the "
                              "--out folder")
    # not flags: the methods' options by dest (nearl/methods/options.py), and the lines a resume prints
    method_options: Dict[str, Any] = field(default_factory=dict)
    resume_notes: List[str] = field(default_factory=list)

    def __post_init__(self):
        unknown = sorted(set(self.method_options) - set(method_option_table()))
        if unknown:
            raise ValueError(f"TrainConfig.method_options: no method declares {unknown}; "
                             f"known: {sorted(method_option_table())}")
        if self.monitor is not None and self.monitor not in MT.names(self.task):
            raise UserError(f"--monitor {self.monitor}: not a {self.task} metric; choose one of "
                            f"{', '.join(MT.names(self.task))}")

    def monitored(self) -> str:
        """The validation metric best.pt is chosen by: --monitor, else the task's main metric."""
        return self.monitor or MT.MAIN_METRIC[self.task]

    def option(self, dest: str) -> Any:
        """A method option's value: the one given, else its declared default."""
        if dest in self.method_options:
            return self.method_options[dest]
        return method_option_default(dest)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with `changes` (method options by dest too, into method_options)."""
        changes, extra = _split(changes)
        extra = {**self.method_options, **changes.pop("method_options", {}), **extra}
        return dataclasses.replace(self, method_options=extra, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The flat record a checkpoint holds: every flag, the methods' options filled with defaults."""
        out: Dict[str, Any] = {}
        for f in flag_fields():
            out[f.name] = getattr(self, f.name)
            if f.name == "grad_checkpointing":  # the parser adds the methods' options after the model group
                out.update({dest: self.option(dest) for dest in method_option_table()})
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, warn_unknown: bool = True) -> "TrainConfig":
        """A config from a flat record (a checkpoint's "args", old ones included, or vars() of the parsed
        command line); keys that are no setting (any more) are ignored, with a warning."""
        known, extra = _split(dict(values))
        unknown = sorted(k for k in extra if k not in method_option_table())
        if unknown and warn_unknown:
            warnings.warn(f"TrainConfig: ignoring unknown setting(s) {', '.join(unknown)}", stacklevel=2)
        nested = known.pop("method_options", None) or {}
        return cls(**known, method_options={**nested, **{k: v for k, v in extra.items() if k not in unknown}})

    @classmethod
    def from_namespace(cls, args: Any) -> "TrainConfig":
        """The config of a parsed `python -m nearl.train` command line."""
        return cls.from_dict(vars(args))


def argparse_kwargs(f: dataclasses.Field) -> Dict[str, Any]:
    """add_argument's keywords for a flag field: its argparse keywords, help and default."""
    kw = dict(f.metadata["cli"])
    if f.metadata["help"] is not None:
        kw["help"] = f.metadata["help"]
    kw["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return kw


def option_string(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def option_strings(f: dataclasses.Field) -> List[str]:
    """A flag field's names on the command line: its own (first: argparse's dest), then its aliases."""
    return [option_string(f), *f.metadata.get("aliases", ())]


def flag_fields() -> List[dataclasses.Field]:
    """TrainConfig's fields that are command-line flags, in --help order."""
    return [f for f in dataclasses.fields(TrainConfig) if "cli" in f.metadata]


def method_option_default(dest: str) -> Any:
    opt = method_option_table()[dest][0]
    return opt.kwargs.get("default", False if opt.kwargs.get("action") == "store_true" else None)


def _split(values: Dict[str, Any]):
    """(TrainConfig's own fields, the rest) of a flat record."""
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    return ({k: v for k, v in values.items() if k in own}, {k: v for k, v in values.items() if k not in own})
