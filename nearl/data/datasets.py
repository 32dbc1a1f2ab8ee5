"""Torch datasets over the records, with bad images skipped instead of crashing a run.

A record whose image turns out to be undecodable (BadImageError) makes `__getitem__` return None;
use `collate_skip_bad` (or `collate_skip_bad_with_count`) as the DataLoader's collate_fn so those
entries are dropped from the batch.

Counting bad images: each dataset keeps one byte per record, in shared memory, saying why its image
failed (0: it did not). DataLoader workers hold copies of the dataset but write to the same bytes,
so `skip_counts()` (by reason), `bad_count` and `bad_paths` are exact in the main process, with or
without workers. A record that failed once is not decoded again, nor warned about again, in later
epochs. nearl/data/loadable.py reports the counts (log and metrics.jsonl) and checks that a set has
an image to use at all.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from nearl.data.images import BadImageError, load_image
from nearl.data.records import ImageTextRecord, LabelledRecord
from nearl.data.skips import IMAGE_FAILURES

logger = logging.getLogger("nearl.data")

Transform = Callable[[Any], torch.Tensor]  # PIL image -> tensor (open_clip's preprocess)
Tokenizer = Callable[[str], torch.Tensor]  # str -> (1, context_length) ids (open_clip tokenizer)


# Paths this process has warned about: a validation set rebuilt for every evaluation (and the
# workers forked from this process) does not warn about the same file again.
_WARNED: Set[str] = set()


def warn_once(err: BadImageError) -> None:
    if str(err.path) not in _WARNED:
        _WARNED.add(str(err.path))
        logger.warning("skipping bad image %s", err)


class SkipsBadImages:
    """Shared image loading that turns a BadImageError into None and remembers why, per record."""

    records: list

    def _init_bad(self) -> None:
        # 0 = not failed; k = failed with IMAGE_FAILURES[k - 1]. share_memory_ makes the workers'
        # copies of this tensor (fork or spawn) write to the same memory as the main process's.
        self.failures = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()
        # {reason: n} of the images the reader already dropped (missing, empty: records.Unusable), which
        # the training reports with these (loadable.report_skips); set by whoever built the records.
        self.dropped: Dict[str, int] = {}

    def _fail(self, index: Optional[int], err: BadImageError) -> None:
        if index is not None:
            self.failures[index] = IMAGE_FAILURES.index(err.kind) + 1
        warn_once(err)

    def _load(self, path, transform: Transform, index: Optional[int] = None) -> Optional[torch.Tensor]:
        """transform(image at `path`), or None if it cannot be loaded; `index` (the record's) lets
        the failure be counted once and the file not be decoded again."""
        if index is not None and int(self.failures[index]):
            return None
        try:
            return transform(load_image(path))
        except BadImageError as e:
            self._fail(index, e)
            return None

    def probe(self, index: int) -> Optional[str]:
        """Decode record `index`'s image (no transform): None if it loads, else why (an entry of
        skips.IMAGE_FAILURES); a failure is counted as one met in training would be."""
        if int(self.failures[index]):
            return IMAGE_FAILURES[int(self.failures[index]) - 1]
        try:
            load_image(self.records[index].image)
            return None
        except BadImageError as e:
            self._fail(index, e)
            return e.kind

    def skip_counts(self) -> Dict[str, int]:
        """{reason: number of records} over every record whose image failed so far."""
        codes = torch.bincount(self.failures.long(), minlength=len(IMAGE_FAILURES) + 1).tolist()
        return {IMAGE_FAILURES[k - 1]: n for k, n in enumerate(codes) if k and n}

    def failed(self) -> List[Tuple[int, str]]:
        """(record index, reason) of every failed record, in record order."""
        return [(i, IMAGE_FAILURES[int(self.failures[i]) - 1]) for i in self.failures.nonzero().flatten().tolist()]

    @property
    def bad_count(self) -> int:
        return int(torch.count_nonzero(self.failures))

    @property
    def bad_paths(self) -> List[str]:
        return [str(self.records[i].image) for i, _ in self.failed()]


class ImageTextDataset(SkipsBadImages, Dataset):
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
        image = self._load(record.image, self.transform, i)
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


class LabelledDataset(SkipsBadImages, Dataset):
    """(image_tensor, label) pairs from LabelledRecords."""

    def __init__(self, records: Sequence[LabelledRecord], transform: Transform):
        self.records = list(records)
        self.transform = transform
        self._init_bad()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Optional[Tuple[torch.Tensor, int]]:
        record = self.records[i]
        image = self._load(record.image, self.transform, i)
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
