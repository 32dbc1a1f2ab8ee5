"""The two record types every reader returns: what a dataset needs to find and describe one image."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional


@dataclass
class ImageTextRecord:
    """One image with one or more captions (retrieval / contrastive training)."""

    image: Path
    captions: List[str]
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class LabelledRecord:
    """One image with a class label (classification); `label` indexes the reader's classnames."""

    image: Path
    label: int
    classname: str
    split: Optional[str] = None


class Unusable(NamedTuple):
    """An image a reader was pointed at but could not use: missing, or empty (0 bytes). `reason` is
    skips.MISSING_IMAGE or skips.EMPTY_IMAGE; `split` and `classname` say which records it would be."""

    image: Path
    reason: str
    split: Optional[str] = None
    classname: Optional[str] = None


class Records(list):
    """A reader's records (a plain list otherwise), with `unusable`: the images it named but dropped,
    which training counts with those that fail to decode (the skipped_images record)."""

    def __init__(self, records: Iterable = (), unusable: Iterable[Unusable] = ()):
        super().__init__(records)
        self.unusable = list(unusable)


def unusable(records) -> List[Unusable]:
    """The images a reader dropped from `records` (none for a list no reader returned)."""
    return list(getattr(records, "unusable", ()))
