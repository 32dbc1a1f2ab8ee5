"""The images a model was trained on, kept in its checkpoint (`train_images`) so that an evaluation
which scores some of them can say so (nearl.evaluation.check_training_overlap).

An image is kept as a key: the first 8 bytes of the sha256 of its real path (symbolic links and `..`
resolved), as an int64; a checkpoint holds the sorted keys of its training records (8 bytes an
image: 0.5 MB for 65,000). The same file reached by another path is the same key; a copy of it
elsewhere is another image. Two different paths share a key with odds of about n² / 2⁶⁴.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Iterable, Optional

import torch

ALGORITHM = "nearl-image-paths-v1"


def _key(path) -> int:
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def image_keys(records: Iterable[Any]) -> torch.Tensor:
    """The sorted, distinct keys of the records' images (`record.image`), int64."""
    return torch.tensor(sorted({_key(r.image) for r in records}), dtype=torch.int64)


def training_images(records: Iterable[Any], earlier: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A checkpoint's `train_images` entry for these training records, joined with an `earlier` one (a
    resumed run trained on both)."""
    keys = image_keys(records)
    if earlier and earlier.get("algorithm") == ALGORITHM:
        keys = torch.unique(torch.cat([keys, earlier["keys"].to(torch.int64)]))
    return {"algorithm": ALGORITHM, "count": int(keys.numel()), "keys": keys}


def trained_on(records: Iterable[Any], recorded: Optional[Dict[str, Any]]) -> int:
    """How many of the records' images are among a `train_images` entry's (0 without one)."""
    if not recorded or recorded.get("algorithm") != ALGORITHM:
        return 0
    keys = torch.tensor([_key(r.image) for r in records], dtype=torch.int64)
    return int(torch.isin(keys, recorded["keys"]).sum())
