"""A comparison's settings as one dataclass, `CompareConfig`: what `nearl.comparison.compare` takes.

    from nearl.comparison.run import compare
    from nearl.comparison.config import CompareConfig
    compare(CompareConfig(max_steps=2, seeds="0,1", out="runs/cmp"))

Each field is one `python -m nearl.compare` flag with its default, help and argparse keywords
(nearl/comparison/options.py builds the parser from them). Each run's TrainConfig is derived from
this one (`nearl.comparison.run.train_config`). Imports no torch: --help answers at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from nearl.argtypes import UNCERTAIN_LABELS, non_negative_int, positive_int, steps
from nearl.methods.options import METHODS
from nearl.comparison.protocols import PROTOCOLS
from nearl.training.config import flag


def _flag(default: Any, help: Optional[str] = None, **cli: Any) -> Any:
    return flag(default, "options", help, **cli)  # nearl.compare lists its flags in one group


@dataclass
class CompareConfig:
    """The settings of a comparison (`python -m nearl.compare --help` says each one's meaning)."""
    methods: Optional[str] = _flag(None, "comma-separated, from " + ", ".join(METHODS) +
                                   " (default: every method that applies to --task)")
    seeds: str = _flag("0,1,2", "comma-separated seeds (default %(default)s)")
    protocol: str = _flag("standard", "standard (default): train on --data, evaluate on --split; base2novel: "
                          "train on the base classes, report base, novel and their harmonic mean; few-shot: "
                          "accuracy against K for each K of --shots (classification)", choices=PROTOCOLS)
    shots: str = _flag("1,2,4,8,16", "few-shot: images per class, comma-separated (default %(default)s)")
    max_steps: int = _flag(100, "optimizer steps per run (L-BFGS iterations per candidate for linear-probe); "
                           "default %(default)s", type=steps)
    task: str = _flag("classification", choices=("retrieval", "classification", "multilabel"))
    model: Optional[str] = _flag(None, "open_clip architecture (default: ViT-B-16 with a GPU or --pretrained, "
                                 "NEARL-Tiny otherwise)")
    pretrained: Optional[str] = _flag(None, "backbone weights (default: none = random backbone)")
    data: Optional[str] = _flag(None, "as nearl.train --data (default: the embedded demo set)")
    val_data: Optional[str] = _flag(None)
    test_data: Optional[str] = _flag(None, "evaluation source (default: --data, split --split)")
    format: str = _flag("auto")
    root: Optional[str] = _flag(None)
    label_column: Optional[str] = _flag(None, "as nearl.train's (a label CSV's class-name column)")
    label_columns: Optional[str] = _flag(None, "multilabel: the finding columns, comma-separated")
    label_separator: Optional[str] = _flag(None, "multilabel: --label-column holds several findings split by this")
    uncertain_labels: str = _flag("zeros", "multilabel: a --label-columns cell -1 is a negative (zeros) or a "
                                  "positive (ones)", choices=UNCERTAIN_LABELS)
    k_shot: Optional[int] = _flag(None, type=positive_int)
    templates: Optional[List[str]] = _flag(None, nargs="+")
    split: str = _flag("test", "evaluated split (default test; falls back to val)")
    allow_train_data: bool = _flag(False, "evaluate on images the runs train on (refused by default), with a "
                                   "warning", action="store_true")
    batch_size: int = _flag(32, type=positive_int)
    eval_batch_size: Optional[int] = _flag(None, type=positive_int)
    lr: float = _flag(1e-3, type=float)
    weight_decay: float = _flag(0.05, type=float)
    warmup: Optional[int] = _flag(None, type=non_negative_int)
    precision: str = _flag("fp32", choices=("fp32", "bf16", "fp16"))
    fused: bool = _flag(False, "nearl's Triton kernels (CUDA only)", action="store_true")
    device: Optional[str] = _flag(None, "cpu | cuda (default: cuda when available)")
    workers: int = _flag(2, type=non_negative_int)
    bench_batch: int = _flag(32, "batch of the inference throughput probe", type=positive_int)
    bench_iters: int = _flag(10, "timed iterations of that probe (after 2 warm-up)", type=positive_int)
    train_args: str = _flag("", "extra nearl.train arguments for every run, one string (e.g. \"--grad-clip 0.5\")")
    method_args: List[str] = _flag([], "extra nearl.train arguments for one method, e.g. \"alta=--multiview\" or "
                                   "\"coop=--n-ctx 8\" (repeatable)", action="append", metavar="METHOD=ARGS")
    out: str = _flag("runs/compare")
    overwrite: bool = _flag(False, "run again over an earlier comparison in --out (each run's folder is emptied "
                            "first)", action="store_true")
    no_progress: bool = _flag(False, action="store_true")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CompareConfig":
        """A config from a parsed command line's vars() (unknown keys are refused)."""
        return cls(**dict(values))

    @classmethod
    def from_namespace(cls, args: Any) -> "CompareConfig":
        return cls.from_dict(vars(args))


def compare_flag_fields() -> List[dataclasses.Field]:
    return list(dataclasses.fields(CompareConfig))
