"""Held-out splits made for a source that has none, and the file a run keeps them in.

`nearl.train --val-fraction F --test-fraction G` on a source that brings no split (a flat
ImageFolder, a manifest or label CSV without a split column) holds out those fractions of its
images, seeded by --seed: stratified by class for labelled data (scikit-learn's train_test_split
with `stratify`), a plain seeded split for image-text data. The unit is the image: an image with
several rows (captions) goes whole to one split. The split is made on the images sorted by path, so
the lists depend on the seed and the images, not on the order they were read in. The lists are
written into the run folder as splits.json (SPLITS_FILE):

    {"format": 1, "task": "classification", "data": "/abs/flat", "root": "/abs/flat",
     "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "stratified": true,
     "train": ["blue/0.png", ...], "val": [...], "test": [...]}

Image paths are relative to `root` (the folder a source's relative paths resolve against: --root,
else the ImageFolder itself, else the data file's folder), or absolute when outside it. Applying
the lists again (`nearl.evaluate --checkpoint RUN` with the same --data, and `nearl.train --resume`)
gives each listed image its split; an image a list names that the source no longer has (deleted,
renamed, or now missing or empty) is a UserError naming it, and images in no list (added since the
split) are left out with a warning.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nearl.data.records import Records, unusable
from nearl.data.textfiles import read_json
from nearl.errors import UserError

PathLike = Union[str, Path]
SPLITS_FILE = "splits.json"
LISTS = ("train", "val", "test")
FORMAT = 1
logger = logging.getLogger("nearl.data")


@dataclass(frozen=True)
class HeldOut:
    """What `select_splits` does for a source without splits: make them (`val_fraction`,
    `test_fraction`, `seed`), or apply a splits.json read back (`document`, read from `file`)."""

    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    document: Optional[dict] = None
    file: Optional[str] = None

    def __post_init__(self):
        if self.document is None:
            check_fractions(self.val_fraction, self.test_fraction)


def check_fractions(val: Optional[float], test: Optional[float]) -> None:
    """Each fraction given in (0, 1) and their sum below 1, else a one-line UserError."""
    for name, value in (("--val-fraction", val), ("--test-fraction", test)):
        if value is not None and value != 0 and not 0 < value < 1:
            raise UserError(f"{name} must be in (0, 1), got {value:g}")
    total = (val or 0) + (test or 0)
    if total >= 1:
        raise UserError(f"--val-fraction {val or 0:g} + --test-fraction {test or 0:g} = {total:g}: the held-out "
                        "fractions must sum to less than 1 (the rest is the training data)")
    if total == 0:
        raise UserError("a held-out split needs --val-fraction or --test-fraction")


def base_of(data: PathLike, root: Optional[PathLike]) -> Path:
    """The folder the lists' paths are relative to: `root`, else a folder source, else its file's folder."""
    data = Path(data)
    return Path(root) if root else data if data.is_dir() else data.parent


def image_key(image: PathLike, base: Path) -> str:
    """An image as the lists name it: its path relative to `base` (POSIX), or absolute outside it."""
    path, base = os.path.abspath(image), os.path.abspath(base)
    relative = os.path.relpath(path, base)
    return path if relative.startswith("..") else Path(relative).as_posix()


def split_records(records: Sequence, held: HeldOut, *, data: PathLike, root: Optional[PathLike], task: str
                  ) -> Tuple[Dict[str, list], dict]:
    """({"train", "val", "test": records with that split}, the splits.json document): the split
    `held` makes (stratified by label for labelled records) or the one its document lists."""
    base = base_of(data, root)
    if held.document is not None:
        return _apply(records, held.document, base, held.file or SPLITS_FILE, str(data)), held.document
    first: Dict[str, object] = {}
    for r in sorted(records, key=lambda r: image_key(r.image, base)):
        first.setdefault(image_key(r.image, base), r)
    stratified = task == "classification"
    lists = _make_lists(list(first), [r.label for r in first.values()] if stratified else None, held, str(data))
    document = {"format": FORMAT, "task": task, "data": os.path.abspath(data), "root": os.path.abspath(base),
                "seed": held.seed, "val_fraction": held.val_fraction, "test_fraction": held.test_fraction,
                "stratified": stratified, **lists}
    logger.info("%s: held out %d validation and %d test images of %d (seed %d%s)", data, len(lists["val"]),
                len(lists["test"]), len(first), held.seed, ", stratified by class" if stratified else "")
    return _assign(records, lists, base, unusable(records)), document


def _make_lists(keys: List[str], labels: Optional[List[int]], held: HeldOut, where: str) -> Dict[str, List[str]]:
    """The train / val / test lists of `keys` (sorted): test first, then val from the rest."""
    from sklearn.model_selection import train_test_split  # only when a split is made

    lists, seed = {"train": keys, "val": [], "test": []}, held.seed % 2 ** 32  # scikit-learn's seeds are 32-bit
    parts = (("test", held.test_fraction), ("val", held.val_fraction / (1 - (held.test_fraction or 0))))
    for name, fraction in parts:
        if not fraction:
            continue
        rest = lists["train"]
        try:
            if labels is None:
                lists["train"], lists[name] = train_test_split(rest, test_size=fraction, random_state=seed)
            else:
                lists["train"], lists[name], labels, _ = train_test_split(
                    rest, labels, test_size=fraction, random_state=seed, stratify=labels)
        except ValueError as e:
            raise UserError(f"{where}: cannot hold out a {name} split of {len(rest)} images"
                            f"{' stratified by class' if labels is not None else ''}: {e}") from None
    return {k: sorted(v) for k, v in lists.items()}


def _assign(records: Sequence, lists: Dict[str, List[str]], base: Path, dropped) -> Dict[str, list]:
    """{split: the records of its listed images, marked with it}; the reader's dropped images go with train."""
    split_of = {key: name for name in LISTS for key in lists.get(name, ())}
    out: Dict[str, list] = {name: [] for name in LISTS}
    for r in records:
        name = split_of.get(image_key(r.image, base))
        if name is not None:
            out[name].append(replace(r, split=name))
    return {name: Records(rs, dropped if name == "train" else ()) for name, rs in out.items()}


def _apply(records: Sequence, document: dict, base: Path, file: str, data: str) -> Dict[str, list]:
    """A splits.json applied to a source read again: every listed image must still be there."""
    have = {image_key(r.image, base) for r in records}
    bad = {image_key(u.image, base): u.reason for u in unusable(records)}
    listed = [(name, key) for name in LISTS for key in document.get(name, ())]
    gone = [(name, key) for name, key in listed if key not in have]
    if gone:
        name, key = gone[0]
        why = f" ({bad[key]})" if key in bad else ""
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise UserError(f"{file}: its {name} list names {key}{why}, which {data} no longer has{more} (under "
                        f"{base}): the data changed since the run split it; restore it, or train again")
    extra = len(have - {key for _, key in listed})
    if extra:
        logger.warning("%s: %d images are in none of %s's lists (added since the run split the data?): "
                       "left out", data, extra, file)
    logger.info("%s: the splits of %s (%s)", data, file, ", ".join(f"{n} {len(document.get(n, ()))}" for n in LISTS))
    return _assign(records, document, base, unusable(records))


def read_split_file(path: PathLike) -> dict:
    """A splits.json, checked: an object with a list of image paths for each of train, val, test."""
    document = read_json(Path(path), "split lists")
    if not isinstance(document, dict) or not all(
            isinstance(document.get(n), list) and all(isinstance(k, str) for k in document[n]) for n in LISTS):
        raise UserError(f"{path}: not a run's split lists ({{\"train\": [paths], \"val\": [...], \"test\": [...]}})")
    return document


def run_held_out(run_dir: PathLike, data: Optional[PathLike]) -> Optional[HeldOut]:
    """The split lists of the run in `run_dir` (its splits.json) when `data` is the source they were
    made of (the same path), for evaluation to apply; None when the run has none or `data` is another
    source (said once: that source's own splits are used)."""
    file = Path(run_dir) / SPLITS_FILE
    if not file.is_file() or not data:
        return None
    document = read_split_file(file)
    if os.path.abspath(data) != document.get("data"):
        logger.info("%s holds the held-out lists of %s; %s is another source: its own splits are used",
                    file, document.get("data"), data)
        return None
    return HeldOut(document=document, file=str(file))


def split_file_text(document: dict) -> str:
    """The splits.json text of a document (what a run writes)."""
    return json.dumps(document, indent=1) + "\n"
