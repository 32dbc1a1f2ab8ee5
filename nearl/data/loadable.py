"""Before training or evaluating: is there an image to use at all? During and after: how many images
could not be loaded, and why, reported once per data set (log line and a metrics.jsonl record).

Readers only check that image files exist (decoding every image up front would be slow), so an
undecodable image is met when a dataset loads it; datasets.py counts those by reason. Two hooks for
a training loop:

    require_loadable(dataset, source)            # before the first step: UserError if none loads
    report_skips(dataset, log, step=step, source=source)   # after an epoch and at the end
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nearl.errors import UserError
from nearl.data.datasets import SkipsBadImages
from nearl.data.skips import NAMED, format_counts

logger = logging.getLogger("nearl.data")
# Summaries this process has logged: a validation set is rebuilt for every evaluation, and its
# unchanged count is not worth a line each time.
_LOGGED: set = set()


class _Probe(SkipsBadImages):
    """The failure bookkeeping of a dataset, for a plain list of records."""

    def __init__(self, records: Sequence[Any]):
        self.records = list(records)
        self._init_bad()


def image_dataset(data: Any) -> SkipsBadImages:
    """The dataset that keeps the failure counts: `data` itself, the one it wraps (`.base`, as
    train.py's SeededAugment does), or a counting wrapper around a list of records."""
    seen = data
    while not isinstance(seen, SkipsBadImages) and hasattr(seen, "base"):
        seen = seen.base
    if isinstance(seen, SkipsBadImages):
        return seen
    if isinstance(data, (list, tuple)):
        return _Probe(data)
    raise TypeError(f"expected a dataset of nearl.data.datasets or a list of records, got {type(data).__name__}")


def describe_failures(ds: SkipsBadImages, failures: List[Tuple[int, str]], what: str,
                      source: Optional[str]) -> str:
    """'SOURCE: none of the N <what> images could be loaded (reason: n, ...); e.g. PATH (reason), ...'"""
    counts = ds.skip_counts()
    named = ", ".join(f"{ds.records[i].image} ({reason})" for i, reason in failures[:NAMED])
    more = f" and {len(failures) - NAMED} more" if len(failures) > NAMED else ""
    head = f"{source}: " if source else ""
    return (f"{head}none of the {len(ds.records)} {what} images could be loaded ({format_counts(counts)}); "
            f"e.g. {named}{more}")


def require_loadable(data: Any, source: Optional[str] = None, *, what: str = "training") -> int:
    """Index of the first record whose image decodes, trying them in order (cheap: it stops at the
    first good one; the bad ones tried are counted as in training, and not decoded again).

    data: a dataset of nearl.data.datasets (possibly wrapped, see image_dataset) or a list of
    records. Raises UserError naming `source` (the data file), the first images and the reasons
    when no image loads: a run would otherwise "train" on empty batches.
    """
    ds = image_dataset(data)
    if not ds.records:
        raise UserError(f"{source or 'the data set'}: no {what} records")
    failures: List[Tuple[int, str]] = []
    for i in range(len(ds.records)):
        why = ds.probe(i)
        if why is None:
            return i
        failures.append((i, why))
    goal = "nothing to train on" if what == "training" else f"nothing to use for {what}"
    raise UserError(describe_failures(ds, failures, what, source) + f"; {goal}")


def report_skips(data: Any, log: Any = None, *, step: Optional[int] = None, source: Optional[str] = None,
                 what: str = "training") -> Optional[Dict[str, Any]]:
    """Log how many images of the set could not be loaded (undecodable, or missing or empty: those the
    reader dropped, `dataset.dropped`), by reason, when that number grew since the last report (so
    once per data set, not once per epoch: a bad image is met again each epoch but counted once),
    and write the same as a metrics.jsonl record {"kind": "skipped_images", ...}
    through `log.write` when a log is given. Returns that record, or None when there is nothing new.

    A log with `enabled` False (another rank's) makes this silent. Under torchrun each rank counts
    the records of its own shard.
    """
    ds = image_dataset(data)
    dropped = dict(getattr(ds, "dropped", None) or {})  # missing or empty, dropped by the reader
    total = ds.bad_count + sum(dropped.values())
    if total <= getattr(ds, "_reported", 0):
        return None
    ds._reported = total
    counts = Counter(ds.skip_counts()) + Counter(dropped)
    counts = {reason: counts[reason] for reason in sorted(counts)}
    record = {"kind": "skipped_images", "set": what, "source": source, "step": step,
              "images": len(ds.records) + sum(dropped.values()), "skipped": total, "reasons": counts}
    if log is not None and not getattr(log, "enabled", True):
        return record
    key = (what, source, total, len(ds.records))
    if log is None and key in _LOGGED:
        return record
    _LOGGED.add(key)
    logger.warning("%s data %s: %d of %d images could not be loaded and are skipped (%s)", what,
                   source or "", total, record["images"], format_counts(counts))
    if log is not None:
        log.write(record)
    return record
