"""Row readers for CSV / TSV / JSON-lines files, shared by the manifest, ROCO and MedICaT readers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from ..errors import UserError
from .skips import MALFORMED, SkipCounter
from .textfiles import open_text

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")

Row = Tuple[int, dict]  # (1-based line number, fields)


def table_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise UserError(
        f"{path}: unknown manifest format {suffix!r}; expected one of "
        f"{sorted(CSV_SUFFIXES) + list(JSONL_SUFFIXES)}"
    )


def read_rows(path: Path, counter: SkipCounter) -> Tuple[List[Row], List[str]]:
    """All rows of a CSV/TSV/JSONL file plus its column names (JSONL: union of keys, in order seen).

    Unparseable JSON lines are counted as skipped ("malformed line") rather than aborting the read.
    """
    path = Path(path)
    kind = table_kind(path)
    if kind == "csv":
        with open_text(path, "manifest", newline="") as f:
            reader = csv.DictReader(f, delimiter=CSV_SUFFIXES[path.suffix.lower()])
            try:
                columns = list(reader.fieldnames or [])
                # DictReader puts surplus cells under the key None; they belong to no column.
                rows = [(i + 2, {k: v for k, v in r.items() if k is not None}) for i, r in enumerate(reader)]
            except csv.Error as err:  # e.g. a NUL byte, or a quote left open for megabytes
                raise UserError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
        return rows, columns
    rows, columns = [], {}
    with open_text(path, "manifest") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                counter.skip(MALFORMED)
                continue
            if not isinstance(obj, dict):
                counter.skip(MALFORMED)
                continue
            columns.update(dict.fromkeys(obj))
            rows.append((lineno, obj))
    return rows, list(columns)


def first_json_record(path: Path) -> Optional[dict]:
    """The first parseable object of a JSONL file (used to sniff its layout), or None."""
    with open_text(path, "manifest") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                return obj if isinstance(obj, dict) else None
    return None


def csv_header(path: Path) -> List[str]:
    with open_text(path, "manifest", newline="") as f:
        return next(csv.reader(f, delimiter=CSV_SUFFIXES[path.suffix.lower()]), [])


def clean_text(value) -> str:
    """Collapse whitespace (captions often carry newlines and leading blanks); None/NaN -> ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def captions_from(values: Iterable) -> List[str]:
    """Non-empty captions from cells that hold a string, a JSON list in a string, or a list."""
    out: List[str] = []
    for value in values:
        items: Sequence = [value]
        if isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, str):
            s = value.strip()
            if s.startswith("[") and s.endswith("]"):
                try:
                    parsed = json.loads(s)
                except json.JSONDecodeError:
                    parsed = None  # a caption that merely looks like a list, e.g. "[A] axial CT ..."
                if isinstance(parsed, list):
                    items = parsed
        out.extend(c for c in (clean_text(x) for x in items) if c)
    return out


def resolve(root: Path, value) -> Path:
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else root / p


def first_existing(candidates: Sequence[Path]) -> Path:
    """The first candidate that exists, else the first (so a 'missing image' names a real guess)."""
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]
