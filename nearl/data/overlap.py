"""The images a model was trained on, kept in its checkpoint (`train_images`) so that an evaluation
which scores some of them can say so (nearl.evaluation.run.check_training_overlap).

An image is kept twice, as int64 keys (8 bytes each: 1 MB for 65,000 images):
- `keys`: the first 8 bytes of the sha256 of its real path (symbolic links and `..` resolved): the
  same file reached by another path is the same key;
- `content`: the first 8 bytes of the sha1 of its size, first and last bytes (`content_key`): a copy of it
  elsewhere, or the same data set unpacked again, is the same key. Exported adapters carry these
  alone (train_images.json, nearl.store.adapter_files): they say nothing about this machine's paths.
A record written before `content` existed (`keys` alone) is checked by path only; one written before
any record (`train_images` None) not at all: the evaluation says so. Two different images share a
key with odds of about n² / 2⁶⁴.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

ALGORITHM = "nearl-image-paths-v1"
CONTENT_ALGORITHM = "nearl-image-content-v1"
# A file's size, first and last 16 KiB (a smaller file whole). Headers differ between any two real
# images (a DICOM's SOP instance UID, a JPEG's or PNG's first compressed blocks), and a bounded read
# keeps the record cheap for the largest sets: hashing whole files would read MIMIC-CXR-JPG's 570 GB
# once more before the first step; this reads 32 KiB an image, and waits mostly on the file opens.
EDGE = 16 << 10
PROGRESS_FROM = 2000  # images: fewer are hashed in about a second


def _key(path) -> int:
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


# content keys already computed in this process, by (path, size, mtime): nearl.compare hashes its
# training pool, then every run's fit hashes its training images and its evaluation the evaluated
# ones, all the same files; a file changed since has another size or mtime
_CONTENT_KEYS: Dict[Tuple[str, int, int], Optional[int]] = {}


def content_key(path) -> Optional[int]:
    """The key of an image file's bytes (its size, first and last `EDGE` bytes), None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:  # unreadable: the loader skips it, and it is no evidence of overlap
        return None
    seen = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if seen not in _CONTENT_KEYS:
        _CONTENT_KEYS[seen] = _hash_content(path)
    return _CONTENT_KEYS[seen]


def _hash_content(path) -> Optional[int]:
    h = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"{size}\n".encode())
            h.update(f.read(EDGE))
            if size > 2 * EDGE:
                f.seek(size - EDGE)
            h.update(f.read(EDGE))
    except OSError:  # unreadable: the loader skips it, and it is no evidence of overlap
        return None
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def content_keys(paths: List[Any], what: str = "images", progress: bool = True) -> List[Optional[int]]:
    """`content_key` of each path, in order: hashed by a few threads (the reads wait on the disk, and
    hashlib lets go of the GIL), with a progress bar for a large set (`progress`: --no-progress off)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        keys = pool.map(content_key, paths, chunksize=64)
        return list(tqdm(keys, total=len(paths), desc=f"hashing {what}", unit="img",
                         disable=True if not progress or len(paths) < PROGRESS_FROM else None))


def _sorted_keys(keys: Iterable[Optional[int]]) -> torch.Tensor:
    return torch.tensor(sorted({k for k in keys if k is not None}), dtype=torch.int64)


def image_keys(records: Iterable[Any]) -> torch.Tensor:
    """The sorted, distinct keys of the records' images (`record.image`), int64."""
    return _sorted_keys(_key(r.image) for r in records)


def _writes_checkpoints() -> bool:
    """Whether this process is the one that saves checkpoints: rank 0 of a torchrun group (the others
    would read the whole training set again for a record they never write), or a process alone."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def training_images(records: Iterable[Any], earlier: Optional[Dict[str, Any]] = None,
                    progress: bool = True) -> Dict[str, Any]:
    """A checkpoint's `train_images` entry for these training records, joined with an `earlier` one (a
    resumed run trained on both; an earlier record without `content` adds its paths only). Only the
    process that saves checkpoints hashes the images' bytes (`_writes_checkpoints`; `progress`: its bar)."""
    paths = sorted({os.path.realpath(r.image) for r in records})
    keys = _sorted_keys(map(_key, paths))
    if earlier and earlier.get("algorithm") == ALGORITHM:
        keys = torch.unique(torch.cat([keys, earlier["keys"].to(torch.int64)]))
    record = {"algorithm": ALGORITHM, "count": int(keys.numel()), "keys": keys}
    if not _writes_checkpoints():
        return record
    content = _sorted_keys(content_keys(paths, "training images", progress))
    if has_content(earlier):
        content = torch.unique(torch.cat([content, earlier["content"].to(torch.int64)]))
    return {**record, "content_algorithm": CONTENT_ALGORITHM, "content": content}


def has_content(recorded: Optional[Dict[str, Any]]) -> bool:
    """Whether a record holds content keys (else it predates them, or is none)."""
    return bool(recorded and recorded.get("content_algorithm") == CONTENT_ALGORITHM
                and recorded.get("content") is not None)


def trained_on(records: Iterable[Any], recorded: Optional[Dict[str, Any]], progress: bool = True) -> int:
    """How many of the records' images are among a `train_images` entry's, by path or by content (0
    without one). Content is hashed only when the entry holds content keys (`progress`: its bar)."""
    records = list(records)
    if not recorded or not records:
        return 0
    hit = torch.zeros(len(records), dtype=torch.bool)
    if recorded.get("algorithm") == ALGORITHM and recorded.get("keys") is not None:
        keys = torch.tensor([_key(r.image) for r in records], dtype=torch.int64)
        hit |= torch.isin(keys, recorded["keys"].to(torch.int64))
    if has_content(recorded):
        found = content_keys([r.image for r in records], "evaluated images", progress)
        keys = torch.tensor([0 if k is None else k for k in found], dtype=torch.int64)
        readable = torch.tensor([k is not None for k in found], dtype=torch.bool)
        hit |= readable & torch.isin(keys, recorded["content"].to(torch.int64))
    return int(hit.sum())


def keys_to_hex(keys: torch.Tensor) -> List[str]:
    """int64 keys as 16 hex digits each (the 8 bytes, unsigned): how adapters write them in JSON."""
    return [f"{k & 0xFFFFFFFFFFFFFFFF:016x}" for k in keys.tolist()]


def keys_from_hex(values: Iterable[str]) -> torch.Tensor:
    """`keys_to_hex` read back, sorted (ValueError for anything but 16 hex digits)."""
    keys = []
    for v in values:
        if not isinstance(v, str) or len(v) != 16:
            raise ValueError(f"{v!r} is not a key of 16 hex digits")
        k = int(v, 16)
        keys.append(k - (1 << 64) if k >= 1 << 63 else k)
    return torch.tensor(sorted(keys), dtype=torch.int64)
