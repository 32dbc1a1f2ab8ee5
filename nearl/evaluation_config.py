"""An evaluation's settings as one dataclass, `EvalConfig`: what `nearl.evaluation.evaluate` takes.

    from nearl.evaluation import evaluate
    from nearl.evaluation_config import EvalConfig
    report = evaluate(EvalConfig(checkpoint="runs/demo", data="test.csv"))

Each field is one `python -m nearl.evaluate` flag with its default. The model's source (--checkpoint,
--adapter, --method, --model, --pretrained) is declared with nearl.predict's in
`cli_args.add_model_source`; the other fields hold their help and argparse keywords, and
nearl/evaluate.py builds its parser from them. Imports no torch: --help answers at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from .argtypes import CLASS_SUBSETS, DATA_FORMATS, non_negative_int, positive_int, seed
from .training.config import flag


def _flag(default: Any, help: Optional[str] = None, **cli: Any) -> Any:
    return flag(default, "options", help, **cli)


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
                                choices=("retrieval", "classification"))
    data: Optional[str] = _flag(None, "retrieval: manifest/ROCO/MedICaT; classification: ImageFolder dir or CoOp "
                                "split .json (default: the embedded demo set)")
    format: str = _flag("auto", f"retrieval source format: {'|'.join(DATA_FORMATS)}")
    root: Optional[str] = _flag(None, "image root (manifest / CoOp JSON)")
    split: str = _flag("test", "split to evaluate (default test; falls back to val)")
    classes: str = _flag("all", "classification: evaluate on the base classes (the first half, CoOp's "
                         "base-to-novel protocol), the novel ones, or all", choices=CLASS_SUBSETS)
    templates: Optional[List[str]] = _flag(None, "prompt templates with '{}' (default: nearl.classify.TEMPLATES)",
                                           nargs="+")
    allow_train_data: bool = _flag(False, "score images the checkpoint was trained on (refused by default: the "
                                   "checkpoint or adapter records its training images), with a warning",
                                   action="store_true")
    batch_size: int = _flag(64, type=positive_int)
    workers: int = _flag(2, type=non_negative_int)
    device: Optional[str] = _flag(None, "cpu | cuda | cuda:N (default: cuda when available)")
    precision: str = _flag("fp32", choices=("fp32", "bf16", "fp16"))
    seed: int = _flag(0, "builds a random backbone reproducibly (zero-shot)", type=seed)
    out: Optional[str] = _flag(None, "directory for results.json and results.md")
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
