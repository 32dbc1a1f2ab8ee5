"""Shared by the tests that train: tiny generated data sets (PNGs, a CSV manifest, a class folder), a
run through `nearl.training.fit`, and one intra-op thread on the small CI box."""
from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nearl import training as T

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220), "yellow": (230, 220, 30)}
FAST = ["--workers", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI box is small and shared: one intra-op thread is faster than fighting for two."""
    with one_intra_op_thread():
        yield


@contextmanager
def one_intra_op_thread():
    """One intra-op thread for the duration (`_one_thread`, and module-scoped fixtures that train)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _image(path: Path, colour: str, rng: np.random.Generator, size: int = 40) -> None:
    arr = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_manifest(root: Path, n_train: int = 8, n_val: int = 4, captions_per_image: int = 2, seed: int = 0) -> Path:
    """root/manifest.csv (image, caption, split) over random PNGs; captions are JSON lists."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, split in enumerate(["train"] * n_train + ["val"] * n_val):
        colour = list(COLOURS)[i % len(COLOURS)]
        _image(root / f"img{i}.png", colour, rng)
        caps = [f"a {colour} image number {i}", f"picture {i} in {colour}", f"{colour} sample {i}"][:captions_per_image]
        rows.append({"image": f"img{i}.png", "caption": json.dumps(caps), "split": split})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_image_folder(root: Path, per_class=(4, 2), classes=("red", "green", "blue"), seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.png"""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(d / f"{i}.png", c, rng)
    return root


def train_losses(out: Path):
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    return [r["loss"] for r in recs if r["kind"] == "train"], recs


def run(argv, hooks=None):
    return T.fit(T.parse_config([str(a) for a in argv]), hooks)


TINY_RUN = ["--model", "NEARL-Tiny", "--batch-size", 4, *FAST]


def one_step_run(root: Path):
    """A NEARL-Tiny retrieval run of one step in root/run, and its manifest (one intra-op thread)."""
    with one_intra_op_thread():
        manifest = make_manifest(root / "data", n_train=4, n_val=2)
        run(["--data", manifest, "--max-steps", 1, "--out", root / "run", *TINY_RUN])
    return root / "run", manifest


def one_error_line(capsys, prog):
    """The one line a command line printed for a user's error (warnings aside)."""
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip() and "Warning" not in l]
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- units


class _Interrupt(Exception):
    pass


class _StopAt(T.Hooks):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, record):
        if step == self.step:
            raise _Interrupt
