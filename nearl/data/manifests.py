"""Readers for image-text sets: generic manifests (CSV/TSV/JSONL), ROCO and MedICaT.

Every reader returns a list of ImageTextRecord, drops records with no usable caption or no image
file, and logs one line "<file>: kept K records, skipped S (reason: n, ...)" on the "nearl.data"
logger (see SkipCounter). A reader that keeps nothing raises UserError (a ValueError) naming the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from nearl.errors import UserError
from nearl.data.records import ImageTextRecord, Records
from nearl.data.skips import (EMPTY_CAPTION, MALFORMED, NO_IMAGE_PATH, NO_MATCH, SkipCounter,
                    check_image_file, logger)
from nearl.data.textfiles import open_text
from nearl.data.tabular import (JSONL_SUFFIXES, captions_from, clean_text, csv_header, first_existing,
                      first_json_record, read_rows, resolve, table_kind)

__all__ = ["SkipCounter", "read_manifest", "read_roco", "read_medicat", "read_image_text",
           "FORMATS"]

PathLike = Union[str, Path]
SPLIT_NAMES = ("train", "validation", "val", "test")


def _add_record(records: List[ImageTextRecord], counter: SkipCounter, image: Optional[Path],
                captions: List[str], split: Optional[str], meta: dict) -> None:
    """Keep the record if it has a caption and an image file; else count why not."""
    if image is None:
        counter.skip(NO_IMAGE_PATH)
    elif not captions:
        counter.skip(EMPTY_CAPTION)
    elif check_image_file(image, counter, split):
        records.append(ImageTextRecord(image=image, captions=captions, split=split, meta=meta))
        counter.keep()


def read_manifest(path: PathLike, *, root: Optional[PathLike] = None, image_column: str = "image",
                  caption_columns: Sequence[str] = ("caption",), split_column: str = "split",
                  split: Optional[str] = None, delimiter: Optional[str] = None) -> List[ImageTextRecord]:
    """Read a CSV (.csv), TSV (.tsv) or JSON-lines (.jsonl/.json-lines/.ndjson) manifest (`delimiter`:
    a CSV's separator, instead of the one its suffix implies).

    Each caption column may hold one caption, a JSON list of captions (in a string for CSV, a real
    list for JSONL); all non-empty ones become the record's captions, in column order. Relative
    image paths resolve against `root` (default: the manifest's folder). With `split` given, rows
    whose split column differs are left out (not counted as bad); if there is no split column the
    filter is ignored with a warning. Other columns go to `record.meta`.
    """
    path = Path(path)
    if isinstance(caption_columns, str):
        caption_columns = (caption_columns,)
    root = Path(root) if root is not None else path.parent
    counter = SkipCounter(path, images=root)
    rows, columns = read_rows(path, counter, delimiter)
    if table_kind(path, delimiter) == "csv":  # a CSV header is explicit: a wrong column name is a user error
        missing = [c for c in (image_column, *caption_columns) if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; columns are {columns}")
    has_split = split_column in columns
    if split is not None and not has_split:
        logger.warning("%s: no %r column, so split=%r selects every row", path, split_column, split)
    used = {image_column, split_column, *caption_columns}

    records: List[ImageTextRecord] = []
    for _, row in rows:
        row_split = clean_text(row.get(split_column)) or None if has_split else None
        if split is not None and has_split and row_split != split:
            counter.ignore(f"split != {split}")
            continue
        image_value = clean_text(row.get(image_column))
        image = resolve(root, image_value) if image_value else None
        captions = captions_from(row.get(c) for c in caption_columns)
        meta = {k: v for k, v in row.items() if k not in used}
        _add_record(records, counter, image, captions, row_split, meta)
    counter.finish()
    return Records(records, counter.unusable)


def _split_from_path(path: Path) -> Optional[str]:
    """ROCO keeps each split in its own folder (data/train/radiology/...): recover its name."""
    for part in reversed(path.resolve().parts):
        if part.lower() in SPLIT_NAMES:
            return part.lower()
    return None


def _find_one(directory: Path, name: str, pattern: str) -> Optional[Path]:
    """`name` in `directory`, else the only file matching `pattern` (ROCO ships some files under
    'revised' names such as dlinks_tp_val_revised.txt)."""
    if (directory / name).is_file():
        return directory / name
    matches = sorted(directory.glob(pattern))
    return matches[0] if len(matches) == 1 else None


def _read_tab_lines(path: Path, min_fields: int, counter: SkipCounter) -> Dict[str, List[str]]:
    """id -> remaining tab-separated fields, for ROCO's captions.txt / dlinks.txt."""
    out: Dict[str, List[str]] = {}
    with open_text(path, "ROCO file") as f:
        for line in f:
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < min_fields or not fields[0].strip():
                counter.skip(MALFORMED)
                continue
            out[fields[0].strip()] = fields[1:]
    return out


_PMC_ARCHIVE = re.compile(r"(PMC\d+)\.tar\.gz")
_URL = re.compile(r"(?:ftp|https?)://\S+")


def _read_roco_dir(directory: Path, root: Path, split: Optional[str]) -> List[ImageTextRecord]:
    captions_file = _find_one(directory, "captions.txt", "captions*.txt")
    dlinks_file = _find_one(directory, "dlinks.txt", "dlinks*.txt")
    if captions_file is None or dlinks_file is None:
        raise UserError(f"{directory}: ROCO folder needs captions.txt and dlinks.txt")
    counter = SkipCounter(captions_file, images=root)
    captions = _read_tab_lines(captions_file, 2, counter)
    links = _read_tab_lines(dlinks_file, 3, counter)
    records: List[ImageTextRecord] = []
    for roco_id, fields in captions.items():
        if roco_id not in links:
            counter.skip(NO_MATCH)
            continue
        link, name = links[roco_id][0], links[roco_id][-1].strip()
        # ROCO's fetch script saves each figure as images/<PMC id>_<file name in dlinks.txt>.
        pmc = _PMC_ARCHIVE.search(link)
        candidates = [root / f"{pmc.group(1)}_{name}"] if pmc else []
        candidates.append(root / name)
        url = _URL.search(link)
        meta = {"roco_id": roco_id, "url": url.group(0) if url else link.strip()}
        _add_record(records, counter, first_existing(candidates) if name else None,
                    captions_from(fields[:1]), split, meta)
    unmatched_links = len(set(links) - set(captions))
    if unmatched_links:
        counter.skip(NO_MATCH, unmatched_links)
    counter.finish()
    return Records(records, counter.unusable)


def _read_roco_csv(path: Path, root: Path, split: Optional[str]) -> List[ImageTextRecord]:
    counter = SkipCounter(path, images=root)
    rows, columns = read_rows(path, counter)
    missing = [c for c in ("name", "caption") if c not in columns]
    if missing:
        raise UserError(f"{path}: ROCO CSV needs columns id,name,caption; missing {missing}")
    records: List[ImageTextRecord] = []
    for _, row in rows:
        name = clean_text(row.get("name"))
        image = first_existing([root / "images" / name, root / name]) if name else None
        meta = {"roco_id": clean_text(row.get("id"))}
        _add_record(records, counter, image, captions_from([row.get("caption")]), split, meta)
    counter.finish()
    return Records(records, counter.unusable)


def read_roco(path: PathLike, *, root: Optional[PathLike] = None,
              split: Optional[str] = None) -> List[ImageTextRecord]:
    """Read ROCO in either published layout.

    - a folder (e.g. data/train/radiology/) with captions.txt ("ROCO_00001<TAB>caption") and
      dlinks.txt ("ROCO_00001<TAB>wget ... PMCxxxx.tar.gz ...<TAB>file.jpg"), joined on the ROCO id;
      images in `root` (default <folder>/images/) named <PMCxxxx>_<file.jpg> as ROCO's fetch.py
      saves them, or plain <file.jpg>;
    - a CSV with columns id,name,caption; images in <root>/images/ or <root>/ (root defaults to the
      CSV's folder).
    `split` labels the records (ROCO keeps splits in separate folders); by default it is taken from
    a train/validation/val/test folder in the path.
    """
    path = Path(path)
    split = split if split is not None else _split_from_path(path)
    if path.is_dir():
        return _read_roco_dir(path, Path(root) if root is not None else path / "images", split)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _read_roco_csv(path, Path(root) if root is not None else path.parent, split)
    raise UserError(f"{path}: expected a ROCO folder (captions.txt + dlinks.txt) or a .csv file")


def read_medicat(path: PathLike, *, root: Optional[PathLike] = None) -> List[ImageTextRecord]:
    """Read MedICaT's JSON-lines release (one figure per line).

    Caption: `s2orc_caption`, falling back to `s2_caption` when that is empty or missing. Image: an
    explicit `image` key if present, else <root>/<pdf_hash>_<fig_uri> (the published file naming),
    also looked for in <root>/figures/. `root` defaults to the JSONL's folder.
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    counter = SkipCounter(path, images=root)
    rows, _ = read_rows(path, counter)
    records: List[ImageTextRecord] = []
    for _, obj in rows:
        source = "s2orc_caption" if captions_from([obj.get("s2orc_caption")]) else "s2_caption"
        captions = captions_from([obj.get(source)])
        pdf_hash, fig_uri = clean_text(obj.get("pdf_hash")), clean_text(obj.get("fig_uri"))
        if clean_text(obj.get("image")):
            image: Optional[Path] = resolve(root, obj["image"])
        elif pdf_hash and fig_uri:
            name = f"{pdf_hash}_{fig_uri}"
            image = first_existing([root / name, root / "figures" / name])
        else:
            image = None
        meta = {k: obj[k] for k in ("pdf_hash", "fig_uri", "fig_key", "radiology") if k in obj}
        meta["caption_source"] = source
        _add_record(records, counter, image, captions, clean_text(obj.get("split")) or None, meta)
    counter.finish()
    return Records(records, counter.unusable)


def detect_format(path: PathLike) -> str:
    """'roco' for a folder with captions*.txt or a CSV with name+caption but no image column;
    'medicat' for a JSONL whose first record has pdf_hash; else 'manifest'."""
    path = Path(path)
    if path.is_dir():
        if _find_one(path, "captions.txt", "captions*.txt") is not None:
            return "roco"
        raise UserError(f"{path}: a folder is only understood in ROCO's layout (captions.txt)")
    if path.suffix.lower() in JSONL_SUFFIXES and path.is_file():
        first = first_json_record(path)
        if first is not None and "pdf_hash" in first:
            return "medicat"
    if path.suffix.lower() == ".csv" and path.is_file():
        header = csv_header(path)
        if {"name", "caption"} <= set(header) and "image" not in header:
            return "roco"
    return "manifest"


READERS = {"manifest": read_manifest, "roco": read_roco, "medicat": read_medicat}  # --format's readers
FORMATS = ("auto", *READERS)  # --format's choices (the --help texts read them here: this module imports no torch)


def read_image_text(path: PathLike, *, format: str = "auto", **kw) -> List[ImageTextRecord]:
    """Read any supported image-text source; `format` is one of FORMATS, `kw` go to the reader."""
    if format not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {format!r}")
    if not Path(path).exists():  # not "unknown manifest format ''" for a folder that is not there
        raise UserError(f"{path} does not exist (no such file or folder)")
    if format == "auto":
        format = detect_format(path)
    return READERS[format](path, **kw)
