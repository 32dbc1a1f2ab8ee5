"""Torch datasets over the records, with bad images skipped instead of crashing a run.

A record whose image turns out to be undecodable (BadImageError) makes `__getitem__` return None;
use `collate_skip_bad` (or `collate_skip_bad_with_count`) as the DataLoader's collate_fn so those
entries are dropped from the batch.

Counting bad images: `dataset.bad_count` / `dataset.bad_paths` are updated by `__getitem__`, which
is exact with num_workers=0 only (each worker process has its own copy of the dataset). With
workers, use `collate_skip_bad_with_count`, which returns (batch, n_dropped) so the main process
can add up the drops per batch.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .images import BadImageError, load_image
from .records import ImageTextRecord, LabelledRecord

logger = logging.getLogger("nearl.data")

Transform = Callable[[Any], torch.Tensor]  # PIL image -> tensor (open_clip's preprocess)
Tokenizer = Callable[[str], torch.Tensor]  # str -> (1, context_length) ids (open_clip tokenizer)


class _SkipsBadImages:
    """Shared image loading that turns a BadImageError into None and remembers it."""

    def _init_bad(self) -> None:
        self.bad_count = 0
        self.bad_paths: List[str] = []

    def _load(self, path, transform: Transform) -> Optional[torch.Tensor]:
        try:
            return transform(load_image(path))
        except BadImageError as e:
            self.bad_count += 1
            self.bad_paths.append(str(e.path))
            logger.warning("skipping bad image %s", e)
            return None


class ImageTextDataset(_SkipsBadImages, Dataset):
    """(image_tensor, token_ids) pairs from ImageTextRecords.

    Training picks one of a record's captions at random, from a generator seeded by
    (seed, epoch, index): the same run gives the same captions, and a new epoch (set_epoch) gives a
    new draw. Evaluation always uses the first caption. Token ids are the tokenizer's row 0, shape
    (context_length,).
    """

    def __init__(self, records: Sequence[ImageTextRecord], transform: Transform,
                 tokenizer: Tokenizer, *, train: bool = True, seed: int = 0):
        for r in records:
            if not r.captions:
                raise ValueError(f"record for {r.image} has no captions")
        self.records = list(records)
        self.transform = transform
        self.tokenizer = tokenizer
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self._init_bad()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch's DataLoader iteration (non-persistent workers copy it then)."""
        self.epoch = int(epoch)

    def caption_index(self, i: int) -> int:
        n = len(self.records[i].captions)
        if not self.train or n == 1:
            return 0
        # SeedSequence mixes the three numbers into a well-spread 64-bit seed.
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, np.uint64)[0])
        g = torch.Generator().manual_seed(seed)
        return int(torch.randint(n, (1,), generator=g))

    def tokenize(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text)
        return ids[0] if ids.dim() == 2 else ids

    def __getitem__(self, i: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        record = self.records[i]
        image = self._load(record.image, self.transform)
        if image is None:
            return None
        return image, self.tokenize(record.captions[self.caption_index(i)])

    def captions(self) -> Tuple[List[str], torch.Tensor]:
        """Every caption of every record, flat, and the record index of each (for retrieval
        evaluation: pass the second value as `text_to_image` to metrics.retrieval_recall)."""
        texts: List[str] = []
        owners: List[int] = []
        for i, r in enumerate(self.records):
            texts.extend(r.captions)
            owners.extend([i] * len(r.captions))
        return texts, torch.tensor(owners, dtype=torch.long)


class LabelledDataset(_SkipsBadImages, Dataset):
    """(image_tensor, label) pairs from LabelledRecords."""

    def __init__(self, records: Sequence[LabelledRecord], transform: Transform):
        self.records = list(records)
        self.transform = transform
        self._init_bad()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Optional[Tuple[torch.Tensor, int]]:
        record = self.records[i]
        image = self._load(record.image, self.transform)
        return None if image is None else (image, record.label)

    def labels(self) -> torch.Tensor:
        return torch.tensor([r.label for r in self.records], dtype=torch.long)


def collate_skip_bad(batch: Sequence[Any]) -> Optional[Any]:
    """default_collate without the None entries of bad images; None if the whole batch was bad
    (the training loop should `continue` on a None batch)."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None


def collate_skip_bad_with_count(batch: Sequence[Any]) -> Tuple[Optional[Any], int]:
    """Like collate_skip_bad, but returns (batch_or_None, number_dropped): correct with workers."""
    return collate_skip_bad(batch), sum(b is None for b in batch)
