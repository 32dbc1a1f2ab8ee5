"""Label CSVs for classification: a CSV / TSV (or JSON lines) with an image column and a label column
holding class names, and an optional split column.

    image,label,split
    scans/0001.png,pneumonia,train
    scans/0002.png,normal,test

The columns are named by --image-column (default image) and --label-column (default label); the
separator is the suffix's (.csv comma, .tsv tab) unless --separator names another. The classes are
the label cells' distinct names, sorted (as an ImageFolder's sub-folders are), so the same classes get
the same labels whatever the rows' order. A split cell is train, val (or validation) or test; without
a split column every row is split "all" (a flat ImageFolder's). One class a row: a cell holding a JSON
list (multi-label) is refused; a cell such as "effusion|edema" is one class of that name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from nearl.data.records import LabelledRecord, Records
from nearl.data.skips import NO_IMAGE_PATH, SkipCounter, check_image_file
from nearl.data.tabular import CSV_SUFFIXES, JSONL_SUFFIXES, Columns, clean_text, read_rows, resolve
from nearl.errors import UserError

PathLike = Union[str, Path]
LABEL_SUFFIXES = (*CSV_SUFFIXES, *JSONL_SUFFIXES)
SPLIT_COLUMN = "split"
SPLIT_CELLS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
NO_LABEL = "no label"


def is_label_table(path: Path, columns: Optional[Columns] = None) -> bool:
    """Whether a classification source is a label CSV / TSV / JSONL: by its suffix, or any file but a
    split .json when a --separator is given."""
    suffix = path.suffix.lower()
    return path.is_file() and (suffix in LABEL_SUFFIXES or bool(columns and columns.separator and suffix != ".json"))


def read_label_csv(path: PathLike, *, root: Optional[PathLike] = None, columns: Columns = Columns()
                   ) -> Tuple[Dict[str, List[LabelledRecord]], List[str]]:
    """({split: records}, sorted classnames) of a label CSV; image paths relative to `root` (default the
    file's folder). A missing column, a split cell that is no split, a multi-label cell, or a class the
    train rows do not have (when there are train rows) is a UserError naming the file and line."""
    path = Path(path)
    if columns.caption is not None:
        raise UserError(f"--caption-column names a manifest's captions (--task retrieval); {path} is read as a "
                        "label CSV: name its columns with --image-column and --label-column")
    root = Path(root) if root is not None else path.parent
    image_column, label_column = columns.image or "image", columns.label or "label"
    counter = SkipCounter(path, images=root)
    rows, found = read_rows(path, counter, columns.delimiter())
    missing = [c for c in (image_column, label_column) if c not in found]
    if missing:
        raise UserError(f"{path}: no column {', '.join(map(repr, missing))} (columns found: "
                        f"{', '.join(found) or 'none'}); name them with --image-column and --label-column")
    has_split = SPLIT_COLUMN in found
    cells = []  # (line, image cell, class name, split)
    for line, row in rows:
        image, name = clean_text(row.get(image_column)), _class_name(row.get(label_column), path, line)
        split = _split(row.get(SPLIT_COLUMN), path, line) if has_split else "all"
        if not image:
            counter.skip(NO_IMAGE_PATH)
        elif not name:
            counter.skip(NO_LABEL)
        else:
            cells.append((line, image, name, split))
    classnames = sorted({name for _, _, name, _ in cells})
    _check_classes(cells, path)
    label = {name: i for i, name in enumerate(classnames)}
    splits: Dict[str, List[LabelledRecord]] = {}
    for _, value, name, split in cells:
        image = resolve(root, value)
        records = splits.setdefault(split, [])
        if check_image_file(image, counter, split, name):
            records.append(LabelledRecord(image, label[name], name, split=split if has_split else None))
            counter.keep()
    counter.finish()
    return {s: Records(rs, [u for u in counter.unusable if u.split == s]) for s, rs in splits.items()}, classnames


def _class_name(value, path: Path, line: int) -> str:
    """A label cell's class name; a JSON list (several labels) is refused: one class a row."""
    if isinstance(value, (list, tuple)) or _json_list(value):
        raise UserError(f"{path}: line {line}: label {value!r} holds several labels; a label CSV takes one class "
                        "name a row (multi-label data is not supported)")
    return clean_text(value)


def _json_list(value) -> bool:
    text = value.strip() if isinstance(value, str) else ""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def _split(value, path: Path, line: int) -> str:
    cell = clean_text(value).lower()
    if cell not in SPLIT_CELLS:
        raise UserError(f"{path}: line {line}: split {clean_text(value)!r} is none of train, val, validation, "
                        "test (every row of a split column needs one)")
    return SPLIT_CELLS[cell]


def _check_classes(cells, path: Path) -> None:
    """With train rows, a class no train row has is refused (most often a typo, which would otherwise
    become a class of its own that the model never trains on)."""
    trained = {name for _, _, name, split in cells if split == "train"}
    if not trained:
        return
    for line, _, name, split in cells:
        if name not in trained:
            raise UserError(f"{path}: line {line}: class {name!r} (split {split}) is in no train row; the train "
                            f"rows' classes are {sorted(trained)}")
