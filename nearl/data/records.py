"""The two record types every reader returns: what a dataset needs to find and describe one image."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional


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
