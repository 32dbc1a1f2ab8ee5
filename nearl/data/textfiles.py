"""Opening the text files the readers parse (CSV/TSV, JSON lines, JSON, ROCO's .txt) with errors that
name the file and the line: a manifest saved as Latin-1, or a split file cut short, is the user's
to fix, so it is a UserError pointing at the place, not a UnicodeDecodeError at a buffer offset."""
from __future__ import annotations

import codecs
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO, Union

from nearl.errors import UserError

PathLike = Union[str, Path]
ENCODING = "utf-8-sig"  # -sig: tolerate the byte-order mark Excel writes


def bad_utf8(path: PathLike) -> UserError:
    """The first byte of `path` that is not UTF-8, as 'FILE: line L, column C: byte 0xNN ...'."""
    data = Path(path).read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
    else:  # only a part of the file was bad when read? (it changed meanwhile)
        return UserError(f"{path}: is not UTF-8 text")
    line_start = data.rfind(b"\n", 0, at) + 1
    column = len(data[max(line_start, start):at].decode("utf-8")) + 1  # in characters, 1-based
    line = data.count(b"\n", 0, at) + 1
    return UserError(f"{path}: line {line}, column {column}: byte 0x{data[at]:02x} is not UTF-8; "
                     "save the file as UTF-8")


@contextmanager
def open_text(path: PathLike, what: str = "file", **kw) -> Iterator[TextIO]:
    """open(path) for reading UTF-8 text; a missing file or a non-UTF-8 byte is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding=ENCODING, **kw) as f:
            yield f
    except UnicodeDecodeError:
        raise bad_utf8(path) from None


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """json.load of a UTF-8 file; a syntax error names the line and column (and says so when the
    text stops early: the usual cause is a copy or download cut short)."""
    with open_text(path, what) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = "; is the file complete?" if err.pos >= len(text.rstrip()) else ""
        raise UserError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} "
                        f"({err.msg}){hint}") from None
