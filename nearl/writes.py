"""Writing the files nearl makes for a user, and a write the system refuses as one line.

Every output file (checkpoints, results, predictions, adapters, reports, plots, logs) is written
through this module. `atomic_write` puts the data in a temporary file beside the target
(`.<name>.tmp.<pid>`), fsync's it, then renames it over the target: a reader sees the earlier file
or the new one, never half of one. A write refused by the system (a full disk, a read-only or
immutable file system, no permission) raises `WriteError`, a UserError naming the path and why
("cannot write runs/x/last.pt: no space left on device"), which the command lines print as one line
with exit status 2; the temporary file is removed, and the earlier file is left as it was.
`check_writable` finds out before any work whether a folder can take new files.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Union

from nearl.errors import UserError

PathLike = Union[str, os.PathLike]
Content = Union[bytes, str, Callable[[BinaryIO], None]]

# errno -> the reason said; any other OSError keeps its traceback (it is not the user's to fix).
REASONS = {getattr(errno, name): reason for name, reason in (
    ("ENOSPC", "no space left on device"),
    ("EDQUOT", "disk quota exceeded"),
    ("EFBIG", "file too large for the file system"),
    ("EROFS", "read-only file system"),
    ("EACCES", "permission denied (read-only?)"),
    ("EPERM", "operation not permitted (read-only or immutable?)"),
) if hasattr(errno, name)}


class WriteError(UserError):
    """A file the system refused to write (full disk, read-only, no permission); names the path."""


def write_error(err: BaseException, path: PathLike) -> Optional[WriteError]:
    """The WriteError a failed write of `path` means, or None when it is not one of REASONS.

    torch.save reports a full disk as a RuntimeError of its zip writer ("enforce fail at
    inline_container.cc: unexpected pos"), raised while the OSError is handled or, writing by path,
    with no OSError at all; either way it is said as what it is."""
    cause, seen = err, set()
    while cause is not None and id(cause) not in seen:  # the error, then those it was raised from or during
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in REASONS:
            return WriteError(f"cannot write {path}: {REASONS[cause.errno]}")
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, RuntimeError) and "inline_container" in str(err) and _disk_full(path):
        return WriteError(f"cannot write {path}: {REASONS[errno.ENOSPC]}")
    return None


def _disk_full(path: PathLike) -> bool:
    try:
        return shutil.disk_usage(Path(path).parent).free < 1 << 20
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        if path.exists():
            path.unlink()
    except OSError:
        pass


@contextmanager
def writing(path: PathLike, *partial: Path) -> Iterator[None]:
    """Around the write of `path`: on any failure the `partial` files are removed, and a refused
    write (`write_error`) becomes a WriteError naming `path`; anything else is raised as it was."""
    try:
        yield
    except BaseException as err:
        for leftover in partial:
            _remove(leftover)
        refused = write_error(err, path) if isinstance(err, Exception) else None  # Ctrl-C stays itself
        if refused is not None:
            raise refused from None
        raise


def temporary(path: PathLike) -> Path:
    """The temporary name a write of `path` uses (in the same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _fill(f: BinaryIO, content: Content) -> None:
    """The one place where output bytes reach a file (bytes, text as UTF-8, or a writer function)."""
    if callable(content):
        content(f)
    else:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)


def write_temporary(tmp: Path, content: Content) -> None:
    """`content` into `tmp`, flushed and fsync'ed (the caller renames it into place)."""
    with open(tmp, "wb") as f:
        _fill(f, content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: PathLike, content: Content) -> Path:
    """Write `content` to `path` so that `path` is always the earlier complete file or the new one."""
    path = Path(path)
    tmp = temporary(path)
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_temporary(tmp, content)
        os.replace(tmp, path)
    return path


def atomic_write_all(files: Dict[Path, Content]) -> None:
    """Several files that belong together: every one is written to its temporary file first, and
    only then are they renamed into place, so a refused write leaves all the earlier files as they were."""
    written = []
    try:
        for path, content in files.items():
            with writing(path, temporary(path)):
                path.parent.mkdir(parents=True, exist_ok=True)
                write_temporary(temporary(path), content)
            written.append(path)
        for path in written:
            with writing(path, temporary(path)):
                os.replace(temporary(path), path)
    finally:
        for path in files:
            _remove(temporary(path))


def append_line(path: PathLike, line: str) -> None:
    """Append one line to a log file (a crash loses at most that line)."""
    path = Path(path)
    with writing(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def check_writable(path: Optional[PathLike], flag: str = "--out") -> None:
    """Before any work: `path` must be a folder (or not exist yet) where new files can be made.
    A file is a UserError; a folder the system will not write into is a WriteError."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".nearl-write-check.", dir=existing)
    except OSError as err:
        refused = write_error(err, existing)
        if refused is None:
            raise
        raise WriteError(f"{flag} {path}: {refused}") from None
    os.close(fd)
    os.unlink(probe)
