"""A training run's output folder: one run per folder, one process at a time.

`RunLock` holds DIR/train.lock for the whole run: an exclusive flock(2) on a file that names the
owner (pid, host, start time, command). The kernel drops a flock when its process dies, even by
kill -9, so a second process is refused exactly while the owner lives; a lock file that outlived
its process is reported as stale and taken over. A lock written on another host (a shared file
system, where flock may not reach across machines) cannot be judged from here: it is refused
unless `force=True` (`--force-unlock`). Without fcntl (Windows) only the file's contents are judged.

`prepare` then decides what may happen to the folder: one that holds a run (any of RUN_FILES) is
refused unless the run is resumed in place or `overwrite` is given; overwriting deletes exactly the
run's files, so no checkpoint of the old run can later be mistaken for the new run's.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from nearl.store.checkpoint import BEST, LAST, PREVIOUS, remove_stale_temporaries
from nearl.errors import UserError
from nearl.training import config_file
from nearl.writes import write_error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = "train.lock"
METRICS = "metrics.jsonl"
RUN_FILES = (LAST, PREVIOUS, BEST, METRICS)  # any of these means: a run lives here
DERIVED = ("curves.png", METRICS + ".tmp", config_file.FILE)  # redrawn or rewritten by the run; removed with it


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (tells a reused pid from the original), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def _describe(owner: Dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{when}"


class RunLock:
    """Exclusive use of a run folder by one process; `with RunLock(dir).acquire(): ...`."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.fd: Optional[int] = None
        self.stale: Optional[Dict[str, Any]] = None  # the dead owner whose lock was taken over

    def _refuse(self, owner: Dict[str, Any], why: str) -> UserError:
        return UserError(f"{self.directory} is in use by another training run ({_describe(owner)}): {why}")

    def _read(self, fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            raw += chunk
        try:
            owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            owner = None
        if owner == {} or (isinstance(owner, dict) and "pid" in owner and "host" in owner):
            return owner
        return {"pid": "?", "host": "?", "unreadable": True}  # not a lock a run wrote: its host is unknown

    def _open_locked(self) -> int:
        """An fd of the lock file holding the flock (retried if the file was replaced meanwhile)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                owner = self._read(fd)
                os.close(fd)
                raise self._refuse(owner, "two runs in one folder would overwrite each other's checkpoints "
                                          "and log; wait for it to end or choose another --out") from None
            try:  # the owner may have released (unlinked) the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def acquire(self, force: bool = False) -> "RunLock":
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except OSError as e:
            refused = write_error(e, self.path)  # a read-only or full folder: said as such (nearl/writes.py)
            raise refused or UserError(f"cannot lock the output folder {self.directory}: {e}") from None
        try:
            owner = self._read(fd)
            if owner:
                self._judge(owner, force)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _judge(self, owner: Dict[str, Any], force: bool) -> None:
        """A lock file we could flock was left behind: stale, unless it may still be held elsewhere."""
        host = socket.gethostname()
        pid = owner.get("pid")
        if owner.get("unreadable") and fcntl is not None:
            pass  # no run wrote it, and none holds its flock: garbage, not a lock of another host
        elif owner.get("unreadable") and not force:
            raise self._refuse(owner, f"{self.path} cannot be read, so whether a run holds it cannot be checked; "
                                      "if none does, pass --force-unlock (or delete it)")
        elif owner.get("host") != host:
            if not force:
                raise self._refuse(owner, f"it was written on another host, so whether that run still lives "
                                          f"cannot be checked from {host}; if it has ended, pass --force-unlock "
                                          f"(or delete {self.path})")
        elif fcntl is None and isinstance(pid, int) and _alive(pid) and \
                owner.get("process_start") in (None, _process_start(pid)):
            raise self._refuse(owner, "that process is still running")  # no flock to tell us otherwise
        self.stale = owner

    def stale_note(self) -> str:
        """What was taken over, said once the lock is held."""
        if self.stale.get("unreadable"):
            return f"found an unreadable {self.path.name} (not a lock a run wrote, and no process holds it): taken over"
        return (f"found a stale {self.path.name} of a run that ended without removing it ({_describe(self.stale)}): "
                "taken over")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # before closing: a waiting process then sees a new file, not ours
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def run_files(directory) -> List[str]:
    directory = Path(directory)
    return [name for name in RUN_FILES if (directory / name).exists()]


def prepare(directory, *, resuming_here: bool, overwrite: bool) -> List[str]:
    """Check (and with `overwrite`, empty) a locked run folder; returns lines to report.

    resuming_here: the run continues the checkpoint of this same folder (then its files are its own).
    """
    directory = Path(directory)
    notes: List[str] = []
    found = run_files(directory)
    if found and not resuming_here:
        if not overwrite and not {LAST, PREVIOUS} & set(found):  # nothing --resume could continue
            raise UserError(f"{directory} already holds {', '.join(found)} of a run that left no checkpoint to resume "
                            f"({LAST}); pass --overwrite to delete it and start again, or choose another --out")
        if not overwrite:
            raise UserError(
                f"{directory} already holds a training run ({', '.join(found)}); a new run there would "
                f"replace its checkpoints and log. Pass --resume {directory} to continue it, --overwrite to "
                f"delete it and start again, or choose another --out")
        for name in RUN_FILES + DERIVED:
            path = directory / name
            if path.exists():
                path.unlink()
        notes.append(f"--overwrite: deleted the earlier run in {directory} ({', '.join(found)})")
    stale = remove_stale_temporaries(directory)
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) left by an interrupted save: {', '.join(stale)}")
    return notes
