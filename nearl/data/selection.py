"""Which records a command uses: the one choice of a data source (`--data`, `--format`, `--root`; the
demo set without `--data`) and of a split in it, for training and evaluation alike.

`select_splits(task, data, splits, fallback=...)` reads the source once and returns, for each split
asked for, the records, the split actually used and what they were read from. The sources: an
image-text source (a manifest, ROCO, MedICaT: each record may carry a split, or none), a CoOp split
.json, an ImageFolder with split folders (train/, val/ or validation/, test/) or a flat one (split
"all"). `fallback` names the rule for a split that is not there (the same rule applies to each kind
of source as each command has always applied it):

- TRAINING (`nearl.train`'s --data): "train" is the records of split train or of no split (a
  manifest without a split column, a flat ImageFolder: every record); "val" is the val / validation
  records of a manifest, the val/ or validation/ folder, a split file's "val". Every split folder is
  read (their classes must agree). A split that is not there is empty, silently: the caller says
  what that means (no training records is an error; no validation set is none).
- EVALUATION (`nearl.evaluate`'s --split): a manifest's split asked for ("val" and "validation"
  are one), else test, else val/validation, else every record ("all"), each fallback warned about; a
  split file's split asked for, else test, else val (a split with no records is none), else a
  UserError naming the splits; an ImageFolder's split folder asked for (only it is read), else for
  test/val/validation the val/ or validation/ folder, else a UserError naming the folders found.
- VAL_DATA (`nearl.train --val-data`, a second source for validation): every record of an
  image-text source whatever its split; of a labelled source its first split with records of val,
  test, train, all.

A source without splits can be given them first (`held_out`, nearl/data/splitting.py): train / val
/ test made by --val-fraction / --test-fraction (a source with its own splits refuses them), or a
run's splits.json applied again (nearl.evaluate on that run, --resume); the rules above then choose
among those three. `columns` (nearl.data.tabular.Columns) name a manifest's or a label CSV's columns.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from nearl.data import demo
from nearl.data.labelled import read_image_folder, read_labelled_splits, split_folders
from nearl.data.manifests import read_image_text
from nearl.data.multilabel import read_multilabel_csv
from nearl.data.records import Records, Unusable, unusable
from nearl.data.splitting import HeldOut, split_records
from nearl.data.tabular import Columns
from nearl.errors import UserError

PathLike = Union[str, Path]
VAL_SPLITS = ("val", "validation")  # the two names of the validation split
TRAINING, EVALUATION, VAL_DATA = "training", "evaluation", "val-data"  # the fallback rules
FALLBACKS = (TRAINING, EVALUATION, VAL_DATA)
# Evaluation's fallbacks have always been said on its logger: its name shows in the log line.
logger = logging.getLogger("nearl.evaluate")


@dataclass
class Selection:
    """The records of one split of a source, and the images the reader dropped from it."""

    records: list
    split: str  # the split used: the one asked for, a fallback, or "all" (every record)
    source: str  # what was read: the data file or folder (an ImageFolder's split folder read alone)
    classnames: Optional[List[str]] = None  # a labelled source's classes; None for image-text
    unusable: List[Unusable] = field(default_factory=list)  # this split's images found missing or empty
    split_file: Optional[dict] = None  # the held-out lists (splits.json's document) made or applied, else None


def select_splits(task: str, data: Optional[PathLike], splits: Sequence[str], *, fmt: str = "auto",
                  root: Optional[PathLike] = None, fallback: str = EVALUATION,
                  read: Optional[Callable[[PathLike], list]] = None, columns: Optional[Columns] = None,
                  held_out: Optional[HeldOut] = None) -> List[Selection]:
    """One Selection per split of `splits`, from one reading of `data` (None: the demo set's
    manifest for "retrieval", its split .json for "classification"). `fmt` and `root` go to the
    image-text reader (root: default the manifest's folder) or, for a split .json, root is where its
    images are (default the file's folder). `fallback` is the rule for a missing split (TRAINING,
    EVALUATION, VAL_DATA: the module's docstring). `read(path)`, when given, reads an image-text
    source instead of read_image_text (multi-view studies). `columns` name a manifest's or a label
    CSV's columns and separator (nearl.data.tabular.Columns). `held_out` (nearl/data/splitting.py)
    makes train / val / test of a source that has no split (refused for one that has), or applies a
    run's lists; each Selection's `split_file` is then the lists' document. An image-text `data` is
    read and named as given (a str or a Path); a labelled one as a Path."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if task != "multilabel" and columns is not None and (columns.label_columns or columns.label_separator
                                                         or columns.uncertain != "zeros"):
        raise UserError(f"--label-columns / --label-separator / --uncertain-labels name a multi-label CSV's findings "
                        f"(--task multilabel), not for --task {task}")
    if task == "retrieval":
        path = data if data else demo.demo_manifest()
        records = _read_image_text(path, fmt, root, read, columns)
        document = None
        if held_out is not None:
            _refuse_split_source(held_out, sorted({str(r.split) for r in records if r.split is not None}), path)
            by_split, document = split_records(records, held_out, data=path, root=root, task=task)
            records = Records([r for rs in by_split.values() for r in rs], unusable(by_split["train"]))
        chosen = [_image_text_split(records, split, fallback, str(path)) for split in splits]
        return [replace(c, split_file=document) for c in chosen]
    path = Path(data) if data else demo.demo_split_json()
    if held_out is None and fallback == EVALUATION and path.suffix.lower() != ".json" and path.is_dir() and (
            task != "multilabel"):
        return [_evaluated_folder(path, split) for split in splits]
    if task == "multilabel":  # a multi-label CSV (nearl/data/multilabel.py)
        by_split, classnames = read_multilabel_csv(path, root=root, columns=columns)
    else:
        by_split, classnames = read_labelled_splits(path, root, columns)
    document = None
    if held_out is not None:
        _refuse_split_source(held_out, sorted(set(by_split) - {"all"}), path)
        records = Records([r for rs in by_split.values() for r in rs],
                          [u for rs in by_split.values() for u in unusable(rs)])
        by_split, document = split_records(records, held_out, data=path, root=root, task=task)
    return [replace(_labelled_split(by_split, classnames, split, fallback, path), split_file=document)
            for split in splits]


def _read_image_text(path: PathLike, fmt: str, root: Optional[PathLike], read, columns: Optional[Columns]) -> list:
    """An image-text source's records: by `read` (multi-view studies), else by read_image_text with the
    column flags, which name a manifest's columns (a ROCO or MedICaT source has none of its own)."""
    given = columns.given() if columns is not None else []
    if given and (read is not None or fmt not in ("auto", "manifest") or "--label-column" in given):
        what = ("--multiview (its --view-columns name the image columns)" if read is not None else
                "--task retrieval (a label column is --task classification's)" if "--label-column" in given
                else f"--format {fmt}")
        raise UserError(f"{', '.join(given)}: not for {what}; they name a manifest's columns (CSV/TSV/JSONL)")
    if read is not None:
        return read(path)
    kw = {"root": root} if root else {}
    if given:
        kw.update(image_column=columns.image or "image", caption_columns=(columns.caption or "caption",),
                  delimiter=columns.delimiter())
        return read_image_text(path, format="manifest", **kw)
    return read_image_text(path, format=fmt, **kw)


def _refuse_split_source(held_out: HeldOut, splits: List[str], path: PathLike) -> None:
    """Held-out fractions split a source without splits: one that has its own is refused."""
    if splits and held_out.document is None:
        raise UserError(f"--val-fraction / --test-fraction: {path} has its own splits ({', '.join(splits)}); the "
                        "fractions hold out part of a source without one (a flat ImageFolder, a manifest or label "
                        "CSV without a split column). Drop them, or use the source's splits")


def _image_text_split(records: list, split: str, fallback: str, source: str) -> Selection:
    if fallback == VAL_DATA:
        return Selection(records, "all", source, unusable=unusable(records))
    wanted = VAL_SPLITS if split in VAL_SPLITS else (split,)
    if fallback == TRAINING and split == "train":
        wanted = (None, "train")  # a record without a split is training data
    chosen = _with_split(records, wanted, split, source)
    if chosen.records or fallback == TRAINING:
        return chosen
    for names in (("test",), VAL_SPLITS):
        chosen = _with_split(records, names, names[0], source)
        if chosen.records:
            logger.warning("no records with split %r; using split %r", split, names[0])
            return chosen
    logger.warning("no records with split %r (nor test/val); evaluating on all %d records", split, len(records))
    return Selection(list(records), "all", source, unusable=unusable(records))


def _with_split(records: list, names: Sequence[Optional[str]], used: str, source: str) -> Selection:
    return Selection([r for r in records if r.split in names], used, source,
                     unusable=[u for u in unusable(records) if u.split in names])


def _labelled_split(by_split: Dict[str, list], classnames: List[str], split: str, fallback: str,
                    path: Path) -> Selection:
    """A split of a split .json or of an ImageFolder read whole ({"all": ...} when flat)."""
    if fallback == TRAINING:  # the first split there, even empty; a flat ImageFolder is all training data
        used = next((s for s in ((split, "all") if split == "train" else (split,)) if s in by_split), split)
        return _labelled(by_split.get(used, []), used, path, classnames)
    order = ("val", "test", "train", "all") if fallback == VAL_DATA else (split, "test", "val")
    used = next((s for s in order if by_split.get(s)), None)  # an empty split is none
    if used is None and fallback == VAL_DATA:
        return _labelled([], split, path, classnames)
    if used is None:
        raise UserError(f"{path}: no {split!r} split with records (splits: "
                        f"{', '.join(f'{k} ({len(v)})' for k, v in sorted(by_split.items()))})")
    if used != split and fallback == EVALUATION:
        logger.warning("%s: no %r split; using %r", path, split, used)
    return _labelled(by_split[used], used, path, classnames)


def _labelled(records: list, used: str, source: PathLike, classnames: List[str]) -> Selection:
    """A labelled reader's records (its Records, kept whole) of the split used."""
    return Selection(records, used, str(source), classnames, unusable(records))


def _evaluated_folder(root: Path, split: str) -> Selection:
    """An ImageFolder evaluated: its `split` folder (or the fallback) read alone; a flat one whole."""
    sub = _split_folder(root, split)
    if sub is None:  # root/<class>/<image>: every image is evaluated
        records, classnames = read_image_folder(root)
        return _labelled(records, "all", root, classnames)
    records, classnames = read_image_folder(sub)
    return _labelled(records, sub.name, sub, classnames)


def _split_folder(root: Path, split: str) -> Optional[Path]:
    """The folder of `split` in root/<split>/<class>/<image>, None for a flat root/<class>/<image>.

    Split folders are never taken for classes: without the one asked for, test falls back to
    val/validation (as for manifests and split files), and anything else is a UserError."""
    found = list(split_folders(root))
    if not found:
        return None
    if split in found:
        return root / split
    fallback = VAL_SPLITS if split in ("test", *VAL_SPLITS) else ()
    for name in fallback:
        if name in found:
            logger.warning("%s: no %s/ folder; using %s/ (split folders: %s)", root, split, name,
                           ", ".join(f + "/" for f in found))
            return root / name
    tried = f"{split}/ (nor val/)" if fallback else f"{split}/"
    raise UserError(f"{root}: no {tried} folder to evaluate on; split folders found: "
                    f"{', '.join(f + '/' for f in found)}. Pass --split {found[0]} to evaluate on it")
