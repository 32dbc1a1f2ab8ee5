"""Labelled (classification) sets: ImageFolder trees, CoOp/Dassl split JSON, few-shot sampling and
the CoOp base-to-novel class split."""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from nearl.argtypes import CLASS_SUBSETS
from nearl.errors import UserError
from nearl.data.label_csv import is_label_table, read_label_csv
from nearl.data.records import LabelledRecord, Records
from nearl.data.skips import MALFORMED, SkipCounter, check_image_file, logger
from nearl.data.tabular import Columns
from nearl.data.textfiles import read_json

PathLike = Union[str, Path]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def read_image_folder(root: PathLike) -> Tuple[List[LabelledRecord], List[str]]:
    """ImageFolder layout root/<class>/<image> (images may sit in sub-folders of a class).

    Classes are the sorted sub-folder names; a record's label is its class's index in that order.
    Empty (0-byte) files are skipped and counted; an empty class folder keeps its label, with a
    warning, so labels do not shift when one class happens to be empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    classnames = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classnames:
        raise UserError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    counter = SkipCounter(root, images=root)
    records: List[LabelledRecord] = []
    for label, name in enumerate(classnames):
        files = sorted(p for p in (root / name).rglob("*") if _is_image(p))
        if not files:
            logger.warning("%s: class %r has no images", root, name)
        for p in files:
            if check_image_file(p, counter, classname=name):
                records.append(LabelledRecord(image=p, label=label, classname=name))
                counter.keep()
    counter.finish()
    return Records(records, counter.unusable), classnames


def read_coop_split(json_path: PathLike, *, root: PathLike
                    ) -> Tuple[Dict[str, List[LabelledRecord]], List[str]]:
    """CoOp/Dassl split file {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}.

    Images are at root/relpath. Returns ({split: records}, classnames) with classnames[label] the
    class's name; labels must be 0..C-1 and name each class consistently across splits.
    """
    json_path, root = Path(json_path), Path(root)
    data = read_json(json_path, "split file")
    if not isinstance(data, dict):
        raise UserError(f"{json_path}: expected an object {{split: [[path, label, classname]]}}, "
                        f"got a JSON {type(data).__name__}")
    counter = SkipCounter(json_path, images=root)
    names: Dict[int, str] = {}
    splits: Dict[str, List[LabelledRecord]] = {}
    for split, items in data.items():
        if not isinstance(items, list):
            raise UserError(f"{json_path}: split {split!r} must be a list of [path, label, classname], "
                            f"got a JSON {type(items).__name__}")
        splits[split] = []
        for item in items:
            try:
                relpath, label, classname = item
                label = int(label)
            except (TypeError, ValueError):
                counter.skip(MALFORMED)
                continue
            if names.setdefault(label, classname) != classname:
                raise UserError(f"{json_path}: label {label} is named both "
                                 f"{names[label]!r} and {classname!r}")
            image = root / relpath
            if check_image_file(image, counter, split, classname):
                splits[split].append(LabelledRecord(image, label, classname, split=split))
                counter.keep()
    counter.finish()
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{json_path}: labels must be 0..C-1, got {sorted(names)}")
    splits = {s: Records(rs, [u for u in counter.unusable if u.split == s]) for s, rs in splits.items()}
    return splits, [names[i] for i in range(len(names))]


SPLIT_FOLDERS = ("train", "val", "validation", "test")
NOT_A_SOURCE = ("classification data must be an ImageFolder directory or a CoOp split .json, or a label CSV "
                "(.csv, .tsv, .jsonl: an image and a label column), got {path}")


def not_a_source(path: Path) -> UserError:
    """The error for a classification source that is neither kind: one that is not there says so."""
    if not path.exists():
        return UserError(f"{path} does not exist (no such file or folder)")
    return UserError(NOT_A_SOURCE.format(path=path))


def split_folders(root: Path) -> Dict[str, Path]:
    """{split: folder} of root/<split>/<class>/<image> (SPLIT_FOLDERS' order); {} for a flat root/<class>/<image>.
    Split folders are never taken for classes."""
    return {s: root / s for s in SPLIT_FOLDERS if (root / s).is_dir()}


def read_labelled_splits(path: PathLike, root: Union[PathLike, None] = None, columns: Optional[Columns] = None
                         ) -> Tuple[Dict[str, List[LabelledRecord]], List[str]]:
    """The one reading of a classification source: ({split: records}, classnames) of a CoOp split
    .json (its images under `root`, default the file's folder), of a label CSV (nearl/data/label_csv.py:
    `columns` name its columns; its images under `root` too), of an ImageFolder with split folders
    (the same classes in each; validation/ is split "val"), or of a flat ImageFolder, whose records
    are split "all". Column flags (`columns` given) for a source that has no columns are refused."""
    path = Path(path)
    if is_label_table(path, columns):
        return read_label_csv(path, root=root, columns=columns or Columns())
    if columns is not None and columns.given() and path.exists():
        raise UserError(f"{', '.join(columns.given())}: name a label CSV's columns; {path} is not a .csv, .tsv "
                        "or .jsonl file")
    if path.suffix.lower() == ".json":
        return read_coop_split(path, root=Path(root) if root else path.parent)
    if not path.is_dir():
        raise not_a_source(path)
    folders = split_folders(path)
    if not folders:
        records, classnames = read_image_folder(path)
        return {"all": records}, classnames
    splits, classnames = {}, None
    for split, folder in folders.items():
        records, names = read_image_folder(folder)
        if classnames is not None and names != classnames:
            raise UserError(f"{folder}: classes {names} differ from {list(folders)[0]}/'s {classnames}")
        classnames = names
        splits["val" if split == "validation" else split] = records
    return splits, classnames


def _sort_key(r: LabelledRecord):
    return (r.label, str(r.image))


def k_shot(records: Iterable[LabelledRecord], k: int, seed: int) -> List[LabelledRecord]:
    """k random records per class, the same for a given seed whatever the input order.

    A class with fewer than k records contributes all of them (with a warning). Each class draws
    from its own RNG seeded by (seed, label), so one class's draw does not depend on the others.
    Output is sorted by (label, image path).
    """
    if k < 1:
        raise UserError(f"k (--k-shot) must be >= 1, got {k}")
    by_label: Dict[int, List[LabelledRecord]] = defaultdict(list)
    for r in sorted(records, key=_sort_key):  # sorting first is what makes it order-independent
        by_label[r.label].append(r)
    out: List[LabelledRecord] = []
    for label in sorted(by_label):
        items = by_label[label]
        if len(items) < k:
            logger.warning("k_shot: class %d (%s) has %d images < k=%d; using all of them",
                           label, items[0].classname, len(items), k)
            chosen = items
        else:
            # random.Random(str) seeds via SHA-512: stable across runs and PYTHONHASHSEED.
            chosen = random.Random(f"k_shot:{seed}:{label}").sample(items, k)
        out.extend(sorted(chosen, key=_sort_key))
    return out


def base_novel_split(classnames: Sequence[str]) -> Tuple[List[int], List[int]]:
    """CoOp's base-to-novel protocol: the first ceil(C/2) labels are base, the rest novel."""
    n = len(classnames)
    m = math.ceil(n / 2)
    return list(range(m)), list(range(m, n))


def subset_by_labels(records: Iterable[LabelledRecord], labels: Iterable[int],
                     relabel: bool = True) -> List[LabelledRecord]:
    """Records whose label is in `labels`; with relabel, labels become 0..K-1 in sorted label order
    (so classnames of the subset are [classnames[l] for l in sorted(labels)])."""
    keep = sorted(set(int(l) for l in labels))
    new = {old: i for i, old in enumerate(keep)}
    return [replace(r, label=new[r.label]) if relabel else r for r in records if r.label in new]


ONE_CLASS = "with one class every image is scored right whatever the model (accuracy 100%)"


def require_classes(classnames: Sequence[str], where: str) -> None:
    """A classification task needs two classes at least; a UserError naming `where` and those found."""
    if len(classnames) < 2:
        raise UserError(f"{where}: classification needs at least two classes, found {len(classnames)}: "
                        f"{list(classnames)}; {ONE_CLASS}")


def select_classes(records: Iterable[LabelledRecord], classnames: Sequence[str], which: str
                   ) -> Tuple[List[LabelledRecord], List[str]]:
    """The records and class names of `which` ("all", or base / novel of `base_novel_split`), labels
    renumbered 0..K-1 in the subset's class order. A base or novel half is scored among its own
    classes alone, so each half needs two classes (four in all): fewer is a UserError."""
    if which not in CLASS_SUBSETS:
        raise ValueError(f"classes must be one of {CLASS_SUBSETS}, got {which!r}")
    if which == "all":
        return list(records), list(classnames)
    halves = dict(zip(("base", "novel"), base_novel_split(classnames)))
    short = next((h for h in (which, *halves) if len(halves[h]) < 2), None)
    if short:
        names = [classnames[i] for i in halves[short]]
        raise UserError(f"--classes {which}: the {len(classnames)} classes {list(classnames)} leave the {short} half "
                        f"{len(names)} class{'' if len(names) == 1 else 'es'} ({names}): scored among its own classes "
                        f"alone, every image is right whatever the model; the base-to-novel protocol needs at least "
                        "two classes a half")
    labels = halves[which]
    return subset_by_labels(records, labels), [classnames[i] for i in labels]
