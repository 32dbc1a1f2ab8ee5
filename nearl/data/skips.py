"""Counting what readers drop, so a silently half-empty data set is visible in the log."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import List, Optional, Union

from nearl.errors import UserError
from nearl.data.records import Unusable

logger = logging.getLogger("nearl.data")

NAMED = 3  # images named in a summary line or an error message

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
NO_DICOM_DECODER = "DICOM codec not installed"  # a valid file compressed in a codec no installed plugin reads
IMAGE_FAILURES = (MISSING_IMAGE, EMPTY_IMAGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, CORRUPT_DICOM,
                  UNDECODABLE_IMAGE, NO_DICOM_DECODER)


class SkipCounter:
    """Counts kept and skipped records of one source file, by reason.

    Every reader ends with `counter.finish()`, which logs one line
    "<file>: kept K records, skipped S (missing image: a, empty caption: b)", and one naming the first
    missing or empty images and the folder `images` they were looked for under, and raises UserError
    (naming them too) when nothing was kept. `unusable` lists those images (records.Unusable), which
    training counts with the undecodable ones.
    """

    def __init__(self, source: Union[str, Path], images: Optional[Union[str, Path]] = None):
        self.source = str(source)
        self.images = images
        self.kept = 0
        self.skipped: Counter = Counter()
        self.ignored: Counter = Counter()  # rows deliberately not selected (e.g. other splits)
        self.unusable: List[Unusable] = []

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def bad_image(self, image: Path, reason: str, split: Optional[str] = None,
                  classname: Optional[str] = None) -> None:
        """An image that is missing or empty: skipped, and remembered (`unusable`)."""
        self.skip(reason)
        self.unusable.append(Unusable(image, reason, split, classname))

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

    def examples(self) -> str:
        """'images looked for under ROOT: e.g. PATH (missing image), ... and N more', or '' if none was."""
        if not self.unusable:
            return ""
        shown = ", ".join(f"{u.image} ({u.reason})" for u in self.unusable[:NAMED])
        more = f" and {len(self.unusable) - NAMED} more" if len(self.unusable) > NAMED else ""
        where = f"images looked for under {self.images}: " if self.images is not None else ""
        return f"{where}e.g. {shown}{more}"

    def finish(self, log: Optional[logging.Logger] = None) -> None:
        """Log the summary line (and one naming the first missing or empty images); raise UserError
        naming the file, and those images, if no record was kept."""
        (log or logger).info(self.summary())
        if self.unusable:
            (log or logger).info("%s: %s", self.source, self.examples())
        if self.kept == 0:
            named = f"; {self.examples()}" if self.unusable else ""
            raise UserError(f"no usable records in {self.summary()}{named}")


def format_counts(counts) -> str:
    """'reason: n, ...' sorted by reason (the form every skip line uses)."""
    return _fmt(counts)


def _fmt(counts: Counter) -> str:
    return ", ".join(f"{r}: {n}" for r, n in sorted(counts.items()))


def check_image_file(path: Path, counter: SkipCounter, split: Optional[str] = None,
                     classname: Optional[str] = None) -> bool:
    """Cheap existence/size check done at read time (decoding every image here would be too slow;
    undecodable files are caught at load time by the datasets instead). A missing or empty image is
    counted and remembered with its split and class (`counter.bad_image`)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = None
    reason = MISSING_IMAGE if size is None or not path.is_file() else EMPTY_IMAGE if size == 0 else None
    if reason is not None:
        counter.bad_image(path, reason, split, classname)
    return reason is None
