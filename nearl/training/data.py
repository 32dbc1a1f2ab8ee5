"""The training data of a run: reading its sources (retrieval manifests, classification folders and
CoOp splits, multi-view studies), few-shot sampling, and the augmented dataset the loop draws from."""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch.utils.data import Dataset

from .. import distributed as D
from ..data import demo
from ..data.datasets import ImageTextDataset, LabelledDataset
from ..data.labelled import k_shot, read_labelled_splits, require_classes, select_classes
from ..data.loadable import require_loadable
from ..data.manifests import read_image_text
from ..data.records import Unusable, unusable
from ..errors import UserError
from ..evaluation import VAL_SPLITS
from ..methods.multiview import VIEW_COLUMNS, MultiViewDataset, read_multiview
from .config import TrainConfig

logger = logging.getLogger("nearl.data")


class SeededAugment(Dataset):
    """Makes random augmentation a function of (seed, epoch, index): each item is produced under
    torch / python generators seeded from those three numbers, whatever the worker or the order.
    A resumed run (or another world size) then sees exactly the same tensors."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        s = D.mix_seed(self.seed, self.epoch, i)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                return self.base[i]
        finally:
            random.setstate(py_state)


@dataclass
class TrainData:
    task: str
    train: list
    val: list
    classnames: Optional[List[str]]
    source: str
    unusable: List[Unusable] = field(default_factory=list)  # training images the reader dropped (missing, empty)


def _read_retrieval(path: str, fmt: str, root: Optional[str]):
    return read_image_text(path, format=fmt, **({"root": root} if root else {}))


def _view_columns(text: Optional[str]) -> List[str]:
    cols = [c.strip() for c in str(text or ",".join(VIEW_COLUMNS)).split(",")]
    if len(cols) != len(VIEW_COLUMNS) or not all(cols):
        raise UserError(f"--view-columns needs {len(VIEW_COLUMNS)} comma-separated names, got {cols}")
    return cols


def load_train_data(config: TrainConfig) -> TrainData:
    """The training (and validation) records a run's TrainConfig names (--data, --task, --k-shot, ...)."""
    if config.task == "retrieval":
        if config.k_shot:
            raise UserError("--k-shot applies to --task classification only")
        if config.classes != "all":
            raise UserError("--classes applies to --task classification only")
        path = config.data or str(demo.demo_manifest())
        if config.option("multiview"):
            if config.format not in ("auto", "manifest"):
                raise UserError(f"--multiview reads a manifest (CSV/TSV/JSONL), not --format {config.format}")
            records = read_multiview(path, root=config.root, columns=_view_columns(config.option("view_columns")))
        else:
            records = _read_retrieval(path, config.format, config.root)
        train = [r for r in records if r.split in (None, "train")]
        if config.val_data:
            val = _read_retrieval(config.val_data, config.format, None)
        else:
            val = [r for r in records if r.split in VAL_SPLITS]
        if not train:
            raise UserError(f"{path}: no training records (split 'train' or no split column)")
        dropped = [u for u in unusable(records) if u.split in (None, "train")]
        return TrainData("retrieval", train, val, None, path, unusable=dropped)
    path = Path(config.data) if config.data else demo.demo_split_json()
    splits, classnames = read_labelled_splits(path, config.root)
    train = splits.get("train", splits.get("all", []))  # a flat ImageFolder is all training data
    if config.val_data:
        vs, vnames = read_labelled_splits(Path(config.val_data), None)
        if vnames != classnames:
            raise UserError(f"--val-data classes {vnames} differ from the training classes {classnames}")
        val = vs.get("val") or vs.get("test") or vs.get("train") or vs.get("all", [])
    else:
        val = splits.get("val", [])
    which = config.classes
    require_classes(classnames, str(path))
    dropped = unusable(train)
    (train, names), (val, _) = (select_classes(rs, classnames, which) for rs in (train, val))
    classnames, dropped = names, [u for u in dropped if u.classname in names]
    if not train:
        raise UserError(f"{path}: no training records" + ("" if which == "all" else f" of the {which} classes"))
    if config.k_shot:
        train = k_shot(train, config.k_shot, config.seed)
    present = [classnames[label] for label in sorted({r.label for r in train})]
    if len(present) < 2:
        raise UserError(f"{path}: training images of {len(present)} class ({present}) only, of the classes "
                        f"{classnames}: classification needs images of at least two classes to learn to tell apart")
    unseen = [c for c in classnames if c not in present]
    if unseen:
        logger.warning("%s: no training image for %d of the %d classes (%s): the model never sees them in "
                       "training, though validation and evaluation score them", path, len(unseen), len(classnames),
                       unseen)
    return TrainData("classification", train, val, classnames, str(path), unusable=dropped)


def make_dataset(data: TrainData, model, seed: int, multiview: bool = False) -> Dataset:
    transform = model.image_transform(True)
    if multiview:
        base = MultiViewDataset(data.train, transform, model.tokenizer(), train=True, seed=seed,
                                num_views=model.num_views)
    elif data.task == "retrieval":
        base = ImageTextDataset(data.train, transform, model.tokenizer(), train=True, seed=seed)
    else:
        base = LabelledDataset(data.train, transform)
    base.dropped = dict(Counter(u.reason for u in data.unusable))  # reported with the undecodable ones
    return SeededAugment(base, seed)


def require_decodable(data: TrainData, train, val_source: Optional[str] = None) -> None:
    """Before the first step: a training set (`train`, its records or dataset) or a validation set
    with no decodable image stops the run, naming the data file and the first images, rather than
    an epoch later at the first validation."""
    require_loadable(train, data.source)
    if data.val:
        require_loadable(data.val, val_source or data.source, what="validation")
