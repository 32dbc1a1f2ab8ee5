"""Checkpoints: the learnable parameters only (never the frozen backbone), written atomically.

A checkpoint is a dict loadable with `torch.load(..., weights_only=True)` (no pickled code):

    format, version        "nearl-checkpoint", 1
    model_name, pretrained the backbone to rebuild (open_clip name / tag, file or hf-hub:/local-dir:)
    backbone_seed          the seed the model was built under (rebuilds a random backbone exactly)
    method                 a method of nearl/methods/ ("nearl"; absent in older files, which are nearl's)
    config                 the method's config (NEARLConfig.to_dict() for nearl)
    task, classnames       "retrieval" or "classification" (+ the class names it was trained on)
    model                  model.trainable_state_dict()  (adapters, USEformer, queries)
    optimizer, scheduler, scaler     their state_dicts (scaler None without fp16)
    step, epoch, batch_in_epoch      optimizer steps done; where the data order resumes
    rng                    python / numpy / torch / cuda generator states
    data                   the sampler's state: seed, epoch, start batch, sizes
    best, args, metrics    best validation score so far, the training arguments, last metrics
    train_images           the images it was trained on, as keys of their paths and of their bytes
                           (nearl/data/overlap.py), so that evaluating on them, or on copies of them,
                           is caught; None when not recorded

Writing (`atomic_save`): the new file goes to a temporary name in the same directory, is flushed
and fsync'ed, and only then `os.replace`d over the target; the previous `last.pt` is first linked
(or copied) to `last.prev.pt`, if it can be read: an unreadable `last.pt` is never promoted, so
`last.prev.pt` keeps the last good checkpoint. At every instant `last.pt` is a complete checkpoint
(old or new), so a crash or kill mid-write never loses the last good one; `load_checkpoint` on a
directory falls back to `last.prev.pt` if `last.pt` is unreadable anyway (e.g. a disk that lied
about fsync). A kill mid-write leaves a `.<name>.tmp.<pid>` file; `remove_stale_temporaries` clears
them (the training does, under its folder lock). A state whose model holds NaN or inf is refused.

Every method, linear-probe included, writes this one schema (`training_state`). Models are rebuilt
from a checkpoint by `nearl.methods.build_from_checkpoint`; this module only reads and writes files.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from nearl.errors import UserError
from nearl.store.nonfinite import check_finite_state
from nearl.writes import temporary, write_temporary, writing

logger = logging.getLogger("nearl.checkpoint")

FORMAT = "nearl-checkpoint"
VERSION = 1
LAST, PREVIOUS, BEST = "last.pt", "last.prev.pt", "best.pt"
PathLike = Union[str, os.PathLike]


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, unreadable, or not a NEARL checkpoint)."""


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    """Every global generator a training step could touch, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds {len(cuda)} CUDA generator states, this machine has "
                          f"{torch.cuda.device_count()} GPUs: CUDA generators not restored")


# ----------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike, previous: Optional[PathLike] = None) -> Path:
    """torch.save `obj` to `path` so that `path` is always either the old or the new complete file.

    previous: if given and `path` exists, the old file is kept there (hard link, else copy) before
    the new one replaces it. A write the system refuses (a full disk, a read-only folder) raises
    WriteError naming `path` (nearl/writes.py); the temporary files are removed, the old files kept.
    """
    path = Path(path)
    tmp = temporary(path)
    prev_tmp = temporary(previous) if previous is not None else None
    with writing(path, *(p for p in (tmp, prev_tmp) if p is not None)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_temporary(tmp, lambda f: torch.save(obj, f))
        if previous is not None and path.exists() and not _readable(path):
            logger.warning("%s cannot be read: not kept as %s, which keeps the last good checkpoint",
                           path, Path(previous).name)
        elif previous is not None and path.exists():
            if prev_tmp.exists():
                prev_tmp.unlink()
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links on this file system
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    return path


def _readable(path: Path) -> bool:
    """Whether `path` opens as a NEARL checkpoint (memory-mapped: a truncated or foreign file fails
    without reading the tensors)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


# A run folder's files written through a temporary name (nearl/writes.py); ".png" ended the curves' before.
_TEMPORARY = re.compile(r"^\.(%s)\.tmp\.\d+(\.png)?$" % "|".join(
    re.escape(n) for n in (LAST, PREVIOUS, BEST, "curves.png", "metrics.jsonl")))


def remove_stale_temporaries(directory: PathLike) -> List[str]:
    """Delete the `.<name>.tmp.<pid>` files a killed save left in `directory`; returns their names.
    Only while no other process writes there (the training holds the folder's lock)."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if _TEMPORARY.match(path.name) and path.is_file():
                try:
                    path.unlink()
                    removed.append(path.name)
                except OSError:
                    pass
    return removed


def save_checkpoint(state: Dict[str, Any], directory: PathLike, name: str = LAST) -> Path:
    """Write `state` (see module docstring) as directory/name; `last.pt` keeps `last.prev.pt`.
    A model holding NaN or inf raises NonFiniteError and nothing is written."""
    directory = Path(directory)
    if isinstance(state.get("model"), dict):
        check_finite_state(state["model"], f"checkpoint {directory / name}")
    state = {"format": FORMAT, "version": VERSION, **state}
    previous = directory / PREVIOUS if name == LAST else None
    return atomic_save(state, directory / name, previous)


# The entries of every checkpoint, in the module docstring's order (format and version are added on save).
STATE_KEYS = ("model_name", "pretrained", "backbone_seed", "method", "config", "task", "classnames", "templates",
              "model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "rng", "data",
              "best", "args", "metrics", "train_images")


def training_state(**entries: Any) -> Dict[str, Any]:
    """A checkpoint's state: exactly STATE_KEYS (a missing or unknown entry is a programming error,
    caught here rather than in a later resume)."""
    missing, unknown = sorted(set(STATE_KEYS) - set(entries)), sorted(set(entries) - set(STATE_KEYS))
    if missing or unknown:
        raise ValueError(f"checkpoint state: missing {missing}, unknown {unknown}")
    return {k: entries[k] for k in STATE_KEYS}


# ----------------------------------------------------------------------------- reading
def _load_file(path: Path, map_location) -> Dict[str, Any]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated zip, not a torch file, unpickling refused ...
        raise _unreadable(path, e) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a NEARL-CLIP checkpoint (no format={FORMAT!r} entry)")
    if obj.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj['version']}; this code reads <= {VERSION}")
    model = obj.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        found = "no 'model' entry" if model is None else f"a 'model' entry of {type(model).__name__}, not tensors"
        raise CheckpointError(f"{path} does not fit: it holds {found} (the learnable parameters every "
                              "checkpoint of nearl.train has)")
    obj["path"] = str(path)
    return obj


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """Why torch.load failed, in words: never torch's own advice to retry with weights_only=False,
    which would run whatever code a pickle in the file holds."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}")
    is_zip = head == b"PK\x03\x04"  # torch.save's format since 1.6
    is_legacy = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # a pickle (older torch.save)
    if not (is_zip or is_legacy):
        return CheckpointError(f"{path} is not a NEARL-CLIP checkpoint (not a file written by torch.save)")
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointError(f"{path} is not a NEARL-CLIP checkpoint (it holds pickled Python objects, "
                               "not only tensors and plain data; such files are not loaded, for safety)")
    first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"cannot read checkpoint {path}: the file is truncated or damaged ({first})")


def resolve(path: PathLike) -> Path:
    """A run directory means its last.pt (or last.prev.pt if only that exists)."""
    path = Path(path)
    if path.is_dir():
        for name in (LAST, PREVIOUS):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no {LAST} or {PREVIOUS} in {path}")
    return path


def load_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint file, or a run directory's last.pt with a fallback to last.prev.pt.

    The fallback also applies when `path` names a last.pt that cannot be read. The returned dict
    has an extra "path" entry naming the file actually read.
    """
    path = Path(path)
    target = resolve(path)
    try:
        return _load_file(target, map_location)
    except CheckpointError as err:
        fallback = target.with_name(PREVIOUS)
        if target.name != LAST or not fallback.is_file():
            raise
        said = (str(target.resolve()), str(err))
        if said not in _FALLBACKS_SAID:  # once: a resumed run reads its checkpoint more than once
            _FALLBACKS_SAID.add(said)
            logger.warning("%s; using the previous checkpoint %s", err, fallback)
        return _load_file(fallback, map_location)


_FALLBACKS_SAID: set = set()


def describe(ckpt: Dict[str, Any]) -> str:
    return (f"{ckpt.get('path', '?')}: {ckpt.get('model_name')} (pretrained={ckpt.get('pretrained')}), "
            f"task={ckpt.get('task')}, step {ckpt.get('step')}, epoch {ckpt.get('epoch')}")
