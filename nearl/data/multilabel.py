"""Multi-label CSVs (`--task multilabel`): a CSV / TSV (or JSON lines) with an image column, the findings of
each image, and an optional split column, in one of two layouts.

- Several label columns (CheXpert style), named by --label-columns A,B,C: the classes are those columns, in
  that order. A cell 1 (or 1.0) is a positive, 0, 0.0 or empty a negative, and CheXpert's -1 ("uncertain")
  is read as a negative (the "U-zeros" rule), or with --uncertain-labels ones as a positive ("U-ones"). Any
  other value is a UserError naming the file, line and column.

      image,Atelectasis,Effusion,split
      scans/0001.png,1,,train
      scans/0002.png,-1,1,test

- One delimited label field (NIH ChestX-ray14 style), named by --label-column (default label) with
  --label-separator (e.g. "|"): the classes are the distinct names found, sorted; a value "No Finding" (any
  case) means no positive class and is not a class. A row whose cell is empty is skipped (no label).

      image,label
      scans/0001.png,Effusion|Edema
      scans/0002.png,No Finding

A record carries a multi-hot `targets` tuple (1 positive, 0 negative) over the classes. A split cell is
train, val (or validation) or test, as in a single-label CSV; without a split column every row is split
"all", and --val-fraction / --test-fraction hold images out by a plain seeded split (no stratification for
multi-label data).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from nearl.data.datasets import SkipsBadImages
from nearl.data.label_csv import NO_LABEL, SPLIT_COLUMN, _split
from nearl.data.records import Records
from nearl.data.skips import NO_IMAGE_PATH, SkipCounter, check_image_file
from nearl.data.tabular import Columns, clean_text, read_rows, resolve
from nearl.errors import UserError

PathLike = Union[str, Path]
NO_FINDING = "no finding"  # the delimited layout's value for "no positive class" (compared case-insensitively)
POSITIVE, NEGATIVE, UNCERTAIN = ("1", "1.0"), ("0", "0.0", ""), ("-1", "-1.0")
UNCERTAIN_RULES = {"zeros": "U-zeros: an uncertain (-1) cell is a negative",  # --uncertain-labels (Columns)
                   "ones": "U-ones: an uncertain (-1) cell is a positive"}


@dataclass
class MultiLabelRecord:
    """One image with a multi-hot vector over the reader's classnames (1: the finding is present)."""

    image: Path
    targets: Tuple[int, ...]
    split: Optional[str] = None
    classname: Optional[str] = None  # none: (the single-label records' field, for code that counts skips)


def label_columns(text: Optional[str]) -> List[str]:
    """--label-columns "A,B,C" -> ["A", "B", "C"] (blanks dropped)."""
    return [c.strip() for c in str(text or "").split(",") if c.strip()]


def read_multilabel_csv(path: PathLike, *, root: Optional[PathLike] = None, columns: Optional[Columns] = None
                        ) -> Tuple[Dict[str, List[MultiLabelRecord]], List[str]]:
    """({split: records}, classnames) of a multi-label CSV in either layout (the module's docstring); image
    paths relative to `root` (default the file's folder); columns.uncertain reads -1 cells (UNCERTAIN_RULES).
    A missing column (named with the columns found), a cell that is not 0/1/-1/empty, no layout named, or
    --uncertain-labels ones without label columns is a UserError."""
    path, columns = Path(path), columns or Columns()
    if not path.is_file():
        raise UserError(f"{path}: --task multilabel reads a label CSV / TSV / JSONL file; no such file")
    named = label_columns(columns.label_columns)
    if bool(named) == bool(columns.label_separator):
        raise UserError(f"{path}: --task multilabel needs one layout: --label-columns A,B,... (a 0/1 column per "
                        "class) or --label-column NAME --label-separator '|' (one delimited field)")
    if columns.uncertain != "zeros" and not named:
        raise UserError(f"{path}: --uncertain-labels {columns.uncertain} reads the -1 cells of --label-columns; "
                        "a delimited label field (--label-separator) has no uncertain cells")
    root = Path(root) if root is not None else path.parent
    image_column = columns.image or "image"
    counter = SkipCounter(path, images=root)
    rows, found = read_rows(path, counter, columns.delimiter())
    wanted = [image_column, *(named or [columns.label or "label"])]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(f"{path}: no column {', '.join(map(repr, missing))} (columns found: "
                        f"{', '.join(found) or 'none'}); name them with --image-column and "
                        f"{'--label-columns' if named else '--label-column'}")
    if named:
        cells, classnames = _column_cells(rows, named, path, int(columns.uncertain == "ones")), list(named)
    else:
        cells, classnames = _delimited_cells(rows, columns.label or "label", columns.label_separator)
    has_split = SPLIT_COLUMN in found
    splits: Dict[str, List[MultiLabelRecord]] = {}
    for line, row, targets in cells:
        image = clean_text(row.get(image_column))
        split = _split(row.get(SPLIT_COLUMN), path, line) if has_split else "all"
        if not image:
            counter.skip(NO_IMAGE_PATH)
            continue
        if targets is None:
            counter.skip(NO_LABEL)
            continue
        records = splits.setdefault(split, [])
        if check_image_file(resolve(root, image), counter, split):
            records.append(MultiLabelRecord(resolve(root, image), targets, split if has_split else None))
            counter.keep()
    counter.finish()
    return {s: Records(rs, [u for u in counter.unusable if u.split == s]) for s, rs in splits.items()}, classnames


def _column_cells(rows, named: Sequence[str], path: Path, uncertain: int = 0):
    """(line, row, multi-hot) of the several-columns layout; a -1 cell is `uncertain` (0 or 1)."""
    out = []
    for line, row in rows:
        targets = []
        for column in named:
            cell = clean_text(row.get(column))
            if cell in POSITIVE:
                targets.append(1)
            elif cell in NEGATIVE:
                targets.append(0)
            elif cell in UNCERTAIN:
                targets.append(uncertain)
            else:
                raise UserError(f"{path}: line {line}: column {column!r} holds {cell!r}; a finding column takes 1 "
                                "(positive), 0 or empty (negative), or -1 (uncertain: --uncertain-labels)")
        out.append((line, row, tuple(targets)))
    return out


def _delimited_cells(rows, column: str, separator: str):
    """((line, row, multi-hot or None for an empty cell), sorted classnames) of the delimited layout."""
    names = []
    for line, row in rows:
        cell = clean_text(row.get(column))
        found = [n.strip() for n in cell.split(separator) if n.strip()] if cell else None
        names.append((line, row, None if found is None else [n for n in found if n.lower() != NO_FINDING]))
    classnames = sorted({n for _, _, found in names for n in found or ()})
    if not classnames:
        raise UserError(f"column {column!r}: no finding named in any row (only empty or 'No Finding' cells)")
    index = {n: i for i, n in enumerate(classnames)}
    out = []
    for line, row, found in names:
        targets = None
        if found is not None:
            hot = [0] * len(classnames)
            for n in found:
                hot[index[n]] = 1
            targets = tuple(hot)
        out.append((line, row, targets))
    return out, classnames


class MultiLabelDataset(SkipsBadImages, Dataset):
    """(image_tensor, float multi-hot targets) pairs from MultiLabelRecords."""

    def __init__(self, records: Sequence[MultiLabelRecord], transform):
        self.records = list(records)
        self.transform = transform
        self._init_bad()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        image = self._load(record.image, self.transform, i)
        return None if image is None else (image, torch.tensor(record.targets, dtype=torch.float32))

    def labels(self) -> torch.Tensor:
        """(n, C) float multi-hot targets of every record."""
        return torch.tensor([list(r.targets) for r in self.records], dtype=torch.float32)
