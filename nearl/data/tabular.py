"""Row readers for CSV / TSV / JSON-lines files, shared by the manifest, ROCO and MedICaT readers."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from nearl.errors import UserError
from nearl.data.skips import MALFORMED, SkipCounter
from nearl.data.textfiles import open_text

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")

Row = Tuple[int, dict]  # (1-based line number, fields)


def table_kind(path: Path, delimiter: Optional[str] = None) -> str:
    """"csv" (CSV / TSV: by suffix, or any other file with a `delimiter` given) or "jsonl"."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES or delimiter is not None:
        return "csv"
    raise UserError(
        f"{path}: unknown manifest format {suffix!r}; expected one of "
        f"{sorted(CSV_SUFFIXES) + list(JSONL_SUFFIXES)}"
    )


def read_rows(path: Path, counter: SkipCounter, delimiter: Optional[str] = None) -> Tuple[List[Row], List[str]]:
    """All rows of a CSV/TSV/JSONL file plus its column names (JSONL: union of keys, in order seen).
    `delimiter` (--separator): a CSV's, instead of the one its suffix implies.

    Unparseable JSON lines are counted as skipped ("malformed line") rather than aborting the read.
    """
    path = Path(path)
    kind = table_kind(path, delimiter)
    if kind == "csv":
        with open_text(path, "manifest", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter or CSV_SUFFIXES.get(path.suffix.lower(), ","))
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


SEPARATOR_NAMES = {"\\t": "\t", "tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


@dataclass(frozen=True)
class Columns:
    """The column flags of a table (--image-column, --caption-column, --label-column, --separator;
    open_clip's --csv-img-key, --csv-caption-key, --csv-separator); None: not given (the default
    name: image, caption, label; the separator the file's suffix implies)."""

    image: Optional[str] = None
    caption: Optional[str] = None
    label: Optional[str] = None
    separator: Optional[str] = None
    label_columns: Optional[str] = None  # --task multilabel: "A,B,C", a 0/1 column per class
    label_separator: Optional[str] = None  # --task multilabel: the separator of one delimited label field
    uncertain: str = "zeros"  # --uncertain-labels: a label column's -1 read as 0 ("zeros") or 1 ("ones")

    @classmethod
    def of(cls, config) -> Optional["Columns"]:
        """The column flags of a TrainConfig or EvalConfig; None when none is given."""
        columns = cls(config.image_column, config.caption_column, config.label_column, config.separator,
                      config.label_columns, config.label_separator, config.uncertain_labels or "zeros")
        return columns if columns.given() else None

    def given(self) -> List[str]:
        """The flags given, by name (for the messages that refuse them); --uncertain-labels where not zeros."""
        names = ("--image-column", "--caption-column", "--label-column", "--separator", "--label-columns",
                 "--label-separator", "--uncertain-labels")
        values = (self.image, self.caption, self.label, self.separator, self.label_columns, self.label_separator,
                  None if self.uncertain == "zeros" else self.uncertain)
        return [n for n, v in zip(names, values) if v is not None]

    def delimiter(self) -> Optional[str]:
        """The separator as one character (\\t, tab, comma, semicolon, pipe name one), or None."""
        if self.separator is None:
            return None
        value = SEPARATOR_NAMES.get(self.separator.lower(), self.separator)
        if len(value) != 1:
            raise UserError(f"--separator must be one character (or \\t, tab, comma, semicolon, pipe), "
                            f"got {self.separator!r}")
        return value


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
