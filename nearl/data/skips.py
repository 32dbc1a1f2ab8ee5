"""Counting what readers drop, so a silently half-empty data set is visible in the log."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError

logger = logging.getLogger("nearl.data")

# Reasons shared by the readers (free text is allowed too; these keep the log lines uniform).
MISSING_IMAGE = "missing image"
EMPTY_IMAGE = "empty image file"
NO_IMAGE_PATH = "no image path"
EMPTY_CAPTION = "empty caption"
MALFORMED = "malformed line"
NO_MATCH = "no matching entry"

# Why an image could not be decoded when a dataset loaded it (BadImageError.kind). The order is
# fixed: datasets store a failure as its 1-based position here, in one byte per record.
NOT_AN_IMAGE = "not an image"
TRUNCATED_IMAGE = "truncated image"
CORRUPT_DICOM = "corrupt DICOM"
UNDECODABLE_IMAGE = "undecodable image"
IMAGE_FAILURES = (MISSING_IMAGE, EMPTY_IMAGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, CORRUPT_DICOM,
                  UNDECODABLE_IMAGE)


class SkipCounter:
    """Counts kept and skipped records of one source file, by reason.

    Every reader ends with `counter.finish()`, which logs one line
    "<file>: kept K records, skipped S (missing image: a, empty caption: b)" and raises UserError
    when nothing was kept.
    """

    def __init__(self, source: Union[str, Path]):
        self.source = str(source)
        self.kept = 0
        self.skipped: Counter = Counter()
        self.ignored: Counter = Counter()  # rows deliberately not selected (e.g. other splits)

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def ignore(self, reason: str, n: int = 1) -> None:
        """Rows left out on purpose (not bad data): reported apart from the skips."""
        self.ignored[reason] += n

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        line = f"{self.source}: kept {self.kept} records, skipped {self.total_skipped}"
        if self.skipped:
            line += " (" + _fmt(self.skipped) + ")"
        if self.ignored:
            line += f"; not selected {sum(self.ignored.values())} ({_fmt(self.ignored)})"
        return line

    def finish(self, log: Optional[logging.Logger] = None) -> None:
        """Log the summary line; raise UserError naming the file if no record was kept."""
        (log or logger).info(self.summary())
        if self.kept == 0:
            raise UserError(f"no usable records in {self.summary()}")


def format_counts(counts) -> str:
    """'reason: n, ...' sorted by reason (the form every skip line uses)."""
    return _fmt(counts)


def _fmt(counts: Counter) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))


def check_image_file(path: Path, counter: SkipCounter) -> bool:
    """Cheap existence/size check done at read time (decoding every image here would be too slow;
    undecodable files are caught at load time by the datasets instead)."""
    try:
        size = path.stat().st_size
    except OSError:
        counter.skip(MISSING_IMAGE)
        return False
    if not path.is_file():
        counter.skip(MISSING_IMAGE)
        return False
    if size == 0:
        counter.skip(EMPTY_IMAGE)
        return False
    return True
