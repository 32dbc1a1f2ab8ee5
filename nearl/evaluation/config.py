"""An evaluation's settings as one dataclass, `EvalConfig`: what `nearl.evaluation.evaluate` takes.

    from nearl.evaluation.run import evaluate
    from nearl.evaluation.config import EvalConfig
    report = evaluate(EvalConfig(checkpoint="runs/demo", data="test.csv"))

Each field is one `python -m nearl.evaluate` flag with its default. The model's source (--checkpoint,
--adapter, --method, --model, --pretrained) is declared with nearl.predict's in
`cli_args.add_model_source`; the other fields hold their help and argparse keywords, and
nearl/evaluate.py builds its parser from them. Imports no torch: --help answers at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from nearl.argtypes import CLASS_SUBSETS, UNCERTAIN_LABELS, non_negative_int, positive_int, seed
from nearl.data.manifests import FORMATS
from nearl.training.config import flag


def _flag(default: Any, help: Optional[str] = None, aliases: tuple = (), **cli: Any) -> Any:
    return flag(default, "options", help, aliases, **cli)


def _source(what: str) -> Any:
    return field(default=None, metadata={"help": f"{what} (cli_args.add_model_source says more)"})


@dataclass
class EvalConfig:
    """The settings of an evaluation (`python -m nearl.evaluate --help` says each one's meaning)."""
    checkpoint: Optional[str] = _source("a checkpoint file or run directory; none: zero-shot")
    adapter: Optional[str] = _source("an adapter folder (python -m nearl.export)")
    method: Optional[str] = _source("the method to build fresh, or the one the checkpoint must hold")
    model: Optional[str] = _source("the backbone's architecture")
    pretrained: Optional[str] = _source("the backbone's weights")
    fused: bool = _flag(False, "Triton kernels (CUDA only; falls back otherwise)", action="store_true")
    task: Optional[str] = _flag(None, "default: the checkpoint's task, else retrieval",
                                choices=("retrieval", "classification", "multilabel"))
    data: Optional[str] = _flag(None, "retrieval: manifest/ROCO/MedICaT; classification: ImageFolder dir, CoOp "
                                "split .json or label CSV (default: the embedded demo set)")
    format: str = _flag("auto", f"retrieval source format: {'|'.join(FORMATS)}")
    root: Optional[str] = _flag(None, "image root (manifest / label CSV / CoOp JSON)")
    image_column: Optional[str] = _flag(None, "a manifest's or label CSV's image column (default image)",
                                        ("--csv-img-key",))
    caption_column: Optional[str] = _flag(None, "a manifest's caption column (default caption)",
                                          ("--csv-caption-key",))
    label_column: Optional[str] = _flag(None, "a label CSV's class-name column (default label)")
    label_columns: Optional[str] = _flag(None, "multilabel: the finding columns, comma-separated")
    label_separator: Optional[str] = _flag(None, "multilabel: --label-column holds several findings split by this")
    uncertain_labels: Optional[str] = _flag(None, "multilabel: a --label-columns cell -1 (uncertain) is a negative "
                                            "(zeros) or a positive (ones); default: the checkpoint's rule, else zeros",
                                            ("--uncertain",), choices=UNCERTAIN_LABELS)
    separator: Optional[str] = _flag(None, "a CSV's separator: one character, or \\t / tab (default: comma for "
                                     ".csv, tab for .tsv)", ("--csv-separator",))
    split: str = _flag("test", "split to evaluate (default test; falls back to val). With --checkpoint of a run "
                       "that held out splits of this --data (--val-fraction / --test-fraction), its "
                       "splits.json's lists")
    classes: str = _flag("all", "classification: evaluate on the base classes (the first half, CoOp's "
                         "base-to-novel protocol), the novel ones, or all", choices=CLASS_SUBSETS)
    templates: Optional[List[str]] = _flag(None, "prompt templates with '{}' (default: nearl.model.classify.TEMPLATES)",
                                           nargs="+")
    bootstrap: int = _flag(1000, "classification and multilabel: resamples of the images (with replacement, drawn from --seed) for "
                           "the 95%% confidence intervals of the metrics (default %(default)s; 0: none)",
                           type=non_negative_int, metavar="N")
    allow_train_data: bool = _flag(False, "score images the checkpoint was trained on (refused by default: the "
                                   "checkpoint or adapter records its training images), with a warning",
                                   action="store_true")
    batch_size: int = _flag(64, type=positive_int)
    workers: int = _flag(2, type=non_negative_int)
    device: Optional[str] = _flag(None, "cpu | cuda | cuda:N (default: cuda when available)")
    precision: str = _flag("fp32", choices=("fp32", "bf16", "fp16"))
    seed: int = _flag(0, "builds a random backbone reproducibly (zero-shot) and draws the --bootstrap resamples",
                      type=seed)
    out: Optional[str] = _flag(None, "directory for results.json and results.md (classification and multilabel: "
                               "also confusion_matrix.png and reliability.png)")
    no_progress: bool = _flag(False, action="store_true")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
        """A config from a parsed command line's vars() (unknown keys are refused)."""
        return cls(**dict(values))

    @classmethod
    def from_namespace(cls, args: Any) -> "EvalConfig":
        return cls.from_dict(vars(args))


def eval_flag_fields() -> List[dataclasses.Field]:
    """EvalConfig's fields that nearl/evaluate.py adds itself (after add_model_source's), in order."""
    return [f for f in dataclasses.fields(EvalConfig) if "cli" in f.metadata]
