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

from nearl.training import distributed as D
from nearl.data import selection as S
from nearl.data.datasets import ImageTextDataset, LabelledDataset
from nearl.data.labelled import k_shot, require_classes, select_classes
from nearl.data.loadable import require_loadable
from nearl.data.multilabel import MultiLabelDataset
from nearl.data.records import Unusable
from nearl.data.splitting import SPLITS_FILE, HeldOut, read_split_file, split_file_text
from nearl.data.tabular import Columns
from nearl.errors import UserError
from nearl.methods.multiview import VIEW_COLUMNS, MultiViewDataset, read_multiview
from nearl.training.config import TrainConfig
from nearl.training.options import resume_dir
from nearl.writes import atomic_write

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
    split_file: Optional[dict] = None  # the held-out lists (--val-fraction / --test-fraction), for --out/splits.json


def _multiview_reader(config: TrainConfig):
    """--multiview's reader of the training data: a manifest's, with the view columns."""
    def read(path):
        if config.format not in ("auto", "manifest"):
            raise UserError(f"--multiview reads a manifest (CSV/TSV/JSONL), not --format {config.format}")
        return read_multiview(path, root=config.root, columns=_view_columns(config.option("view_columns")))
    return read


def _view_columns(text: Optional[str]) -> List[str]:
    cols = [c.strip() for c in str(text or ",".join(VIEW_COLUMNS)).split(",")]
    if len(cols) != len(VIEW_COLUMNS) or not all(cols):
        raise UserError(f"--view-columns needs {len(VIEW_COLUMNS)} comma-separated names, got {cols}")
    return cols


def held_out(config: TrainConfig) -> Optional[HeldOut]:
    """The held-out split a run makes (--val-fraction / --test-fraction, seeded by --seed), or on --resume the
    resumed run's lists (its splits.json), applied again whatever the fractions; None: the source's splits."""
    fractions = config.val_fraction or config.test_fraction
    if config.resume:
        saved = resume_dir(config.resume) / SPLITS_FILE
        if saved.is_file():
            return HeldOut(document=read_split_file(saved), file=str(saved))
        if fractions:
            raise UserError(f"--val-fraction / --test-fraction: the run resumed ({config.resume}) has no "
                            f"{SPLITS_FILE}: it trained on all of its data, so images held out now would be ones it "
                            "trained on. "
                            "Start a new run (another --out) to hold out a split")
    if not fractions:
        return None
    if config.val_fraction and config.val_data:
        raise UserError("--val-fraction and --val-data both name the validation data: give one")
    return HeldOut(config.val_fraction or 0.0, config.test_fraction or 0.0, config.seed)


def save_split_file(data: TrainData, out) -> None:
    """--out/splits.json: the held-out lists the run trains on (made, or a resumed run's); a stale one (of
    a run --overwrite replaced, or one that stopped before its first checkpoint) is removed."""
    path = Path(out) / SPLITS_FILE
    if data.split_file is not None:
        atomic_write(path, split_file_text(data.split_file))
        logger.info("held-out split lists: %s", path)
    elif path.is_file():
        path.unlink()
        logger.info("removed %s: this run holds out no split of its data", path)


def load_train_data(config: TrainConfig) -> TrainData:
    """The training (and validation) records a run's TrainConfig names (--data, --task, --k-shot, ...)."""
    kw = dict(root=config.root, fallback=S.TRAINING, columns=Columns.of(config), held_out=held_out(config))
    if config.task == "retrieval":
        if config.k_shot:
            raise UserError("--k-shot applies to --task classification only")
        if config.classes != "all":
            raise UserError("--classes applies to --task classification only")
        read = _multiview_reader(config) if config.option("multiview") else None
        train, val = S.select_splits("retrieval", config.data, ("train", "val"), fmt=config.format, read=read, **kw)
        if config.val_data:  # every record of it, read by --format (never as multi-view studies)
            [val] = S.select_splits("retrieval", config.val_data, ("val",), fmt=config.format, fallback=S.VAL_DATA,
                                    columns=kw["columns"])
        if not train.records:
            raise UserError(f"{train.source}: no training records (split 'train' or no split column)")
        return TrainData("retrieval", train.records, val.records, None, train.source, unusable=train.unusable,
                         split_file=train.split_file)
    if config.task == "multilabel":
        return _multilabel_train_data(config, kw)
    # a flat ImageFolder is all training data (unless --val-fraction / --test-fraction hold some out)
    chosen, val = S.select_splits("classification", config.data, ("train", "val"), **kw)
    path, train, classnames, val = chosen.source, chosen.records, chosen.classnames, val.records
    if config.val_data:
        [other] = S.select_splits("classification", config.val_data, ("val",), fallback=S.VAL_DATA,
                                  columns=kw["columns"])
        if other.classnames != classnames:
            raise UserError(f"--val-data classes {other.classnames} differ from the training classes {classnames}")
        val = other.records
    which = config.classes
    require_classes(classnames, str(path))
    dropped = chosen.unusable
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
    return TrainData("classification", train, val, classnames, str(path), unusable=dropped,
                     split_file=chosen.split_file)


def _multilabel_train_data(config: TrainConfig, kw: dict) -> TrainData:
    """The records of a multi-label CSV (nearl/data/multilabel.py): its train and val splits (or --val-data's)."""
    if config.k_shot or config.classes != "all":
        raise UserError("--k-shot and --classes apply to --task classification only (not multilabel)")
    if config.data is None:
        raise UserError("--task multilabel needs --data: a multi-label CSV (no demo set is multi-label)")
    chosen, val = S.select_splits("multilabel", config.data, ("train", "val"), **kw)
    if config.val_data:
        [val] = S.select_splits("multilabel", config.val_data, ("val",), fallback=S.VAL_DATA, columns=kw["columns"])
        if val.classnames != chosen.classnames:
            raise UserError(f"--val-data classes {val.classnames} differ from the training classes "
                            f"{chosen.classnames}")
    if not chosen.records:
        raise UserError(f"{chosen.source}: no training records (split 'train' or no split column)")
    return TrainData("multilabel", chosen.records, val.records, chosen.classnames, chosen.source,
                     unusable=chosen.unusable, split_file=chosen.split_file)


def make_dataset(data: TrainData, model, seed: int, multiview: bool = False) -> Dataset:
    transform = model.image_transform(True)
    if multiview:
        base = MultiViewDataset(data.train, transform, model.tokenizer(), train=True, seed=seed,
                                num_views=model.num_views)
    elif data.task == "retrieval":
        base = ImageTextDataset(data.train, transform, model.tokenizer(), train=True, seed=seed)
    elif data.task == "multilabel":
        base = MultiLabelDataset(data.train, transform)
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
