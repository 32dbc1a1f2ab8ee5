"""Training on CPU with the tiny backbone: the loss falls, resume is exact, classification runs,
the demo command works end to end. Data are a few generated PNGs + a CSV manifest in tmp_path."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nearl import argtypes as A
from nearl import checkpoint as C
from nearl import methods as MT
from nearl import training as T
from nearl.distributed import ShardedBatchSampler
from nearl.schedule import WarmupCosine

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
def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup=2, total=10)
    assert [s(0), s(1)] == [0.5, 1.0]
    assert s(2) == pytest.approx(1.0)
    assert s(6) == pytest.approx(0.5)
    assert s(10) == pytest.approx(0.0) and s(50) == pytest.approx(0.0)
    assert all(s(i) >= s(i + 1) for i in range(2, 12))
    assert WarmupCosine(0, 4, min_ratio=0.1)(4) == pytest.approx(0.1)


def test_sharded_sampler_global_batches_and_resume():
    one = ShardedBatchSampler(21, 8, seed=3)
    ranks = [ShardedBatchSampler(21, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1)
    single = list(one)
    sharded = [a + b for a, b in zip(*ranks)]
    assert single == sharded and len(single) == 2  # 21 // 8, last partial batch dropped
    one.set_epoch(1, start=1)
    assert list(one) == single[1:]
    one.set_epoch(2)
    assert list(one) != single  # a new epoch, a new order
    again = ShardedBatchSampler(21, 8, seed=3)
    again.set_epoch(2)
    assert list(again) == list(one)  # a function of (seed, epoch) only


def test_layers_flag():
    assert A.block_numbers("all") is None and A.block_numbers("none") == []
    assert A.block_numbers("1,3-5") == [1, 3, 4, 5]


# ----------------------------------------------------------------------------- training
def test_loss_falls_and_outputs(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=4)
    out = tmp_path / "run"
    summary = run(["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 8, "--max-steps", 8,
                   "--lr", 3e-3, "--warmup", 2, "--eval-every", 0, "--out", out, *FAST])
    assert summary["step"] == 8
    losses, recs = train_losses(out)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert {"contrastive", "query_alignment", "lr", "samples_per_s"} <= set(recs[0])
    val = [r for r in recs if r["kind"] == "val"]
    assert len(val) == 1 and "mean_recall" in val[0]  # the final validation
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (out / name).is_file(), name
    ckpt = C.load_checkpoint(out)
    assert ckpt["step"] == 8 and ckpt["task"] == "retrieval" and ckpt["model_name"] == "NEARL-Tiny"


def test_checkpoint_holds_no_backbone_and_rebuilds(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / "run"
    run(["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 4, "--max-steps", 2, "--lr", 1e-2,
         "--out", out, *FAST])
    raw = torch.load(out / "last.pt", weights_only=True)  # no pickled code in a checkpoint
    assert not any(k.startswith("backbone") for k in raw["model"])
    model = MT.build_from_checkpoint(raw)
    assert set(raw["model"]) == set(model.trainable_state_dict())
    n_saved = sum(v.numel() for v in raw["model"].values())
    assert n_saved == model.num_trainable_parameters() < sum(p.numel() for p in model.backbone.parameters()) / 10
    assert os.path.getsize(out / "last.pt") < 8 * n_saved + 2_000_000  # weights + Adam moments, no backbone
    # The trained adapters differ from a fresh model; the rebuilt random backbone is the same.
    fresh = MT.build_method("nearl", "NEARL-Tiny", None, seed=0)
    for (n, a), b in zip(model.backbone.state_dict().items(), fresh.backbone.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(model.trainable_state_dict()["adapters.vision.layers.1.w_up"],
                           fresh.trainable_state_dict()["adapters.vision.layers.1.w_up"])
    assert not (out / "best.pt").exists()  # no validation records -> no best.pt


class _Interrupt(Exception):
    pass


class _StopAt(T.Hooks):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, record):
        if step == self.step:
            raise _Interrupt


def test_resume_is_exact(tmp_path):
    """Accumulation 2, interrupted mid-epoch after step 3: the resumed run's losses (and the
    validation at the epoch end in between) equal an uninterrupted run's."""
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=4)
    common = ["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 2, "--accum-steps", 2,
              "--max-steps", 5, "--lr", 3e-3, "--warmup", 1, *FAST]
    run([*common, "--out", tmp_path / "full"])
    full, full_recs = train_losses(tmp_path / "full")

    with pytest.raises(_Interrupt):
        run([*common, "--out", tmp_path / "cut", "--save-every", 3], hooks=_StopAt(3))
    cut = C.load_checkpoint(tmp_path / "cut")
    assert (cut["step"], cut["epoch"], cut["batch_in_epoch"]) == (3, 1, 2)  # 2 steps/epoch, mid-epoch
    summary = run(["--resume", tmp_path / "cut", "--no-progress"])  # everything else from the checkpoint
    assert summary["step"] == 5
    resumed, resumed_recs = train_losses(tmp_path / "cut")
    assert len(resumed) == len(full) == 5
    assert resumed == full  # bit for bit on CPU
    strip = lambda recs: [{k: v for k, v in r.items() if not k.startswith("samples")} for r in recs]
    assert strip(resumed_recs) == strip(full_recs)


def test_classification_runs(tmp_path, capsys):
    root = make_image_folder(tmp_path / "folder")
    out = tmp_path / "cls"
    summary = run(["--task", "classification", "--model", "NEARL-Tiny", "--data", root, "--batch-size", 6,
                   "--max-steps", 3, "--lr", 3e-3, "--fused", "--templates", "a {} image.", "a photo of {}.",
                   "--lambda-q", 0.5, "--out", out, *FAST])
    text = capsys.readouterr().out
    assert "--fused" in text and "reference PyTorch path" in text  # no GPU: a clear fallback
    assert "RANDOM" in text  # no --pretrained: said plainly
    assert summary["step"] == 3
    losses, recs = train_losses(out)
    assert {"cross_entropy", "query_alignment"} <= set(recs[0]) and all(np.isfinite(losses))
    val = [r for r in recs if r["kind"] == "val"]
    assert val and {"accuracy", "macro_f1", "macro_auc"} <= set(val[-1])
    ckpt = C.load_checkpoint(out / "best.pt")
    assert ckpt["task"] == "classification" and ckpt["classnames"] == ["blue", "green", "red"]
    assert ckpt["templates"] == ["a {} image.", "a photo of {}."]


def test_k_shot_and_bad_image(tmp_path, capsys):
    root = make_image_folder(tmp_path / "folder", per_class=(4, 1), classes=("red", "green"))
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png at all")
    common = ["--task", "classification", "--model", "NEARL-Tiny", "--data", root, "--max-steps", 1,
              "--eval-every", 0, *FAST]
    run([*common, "--k-shot", 2, "--batch-size", 4, "--out", tmp_path / "ks"])
    assert "4 training" in capsys.readouterr().out  # 2 per class
    run([*common, "--batch-size", 9, "--out", tmp_path / "bad"])  # one batch holding every image
    losses, recs = train_losses(tmp_path / "bad")
    assert recs[0]["samples"] == 8 and np.isfinite(losses[0])  # the undecodable one was dropped


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, precision):
    manifest = make_manifest(tmp_path / "data", n_train=4, n_val=0)
    out = tmp_path / precision
    run(["--model", "NEARL-Tiny", "--data", manifest, "--batch-size", 4, "--max-steps", 2,
         "--precision", precision, "--out", out, *FAST])
    losses, recs = train_losses(out)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert ("loss_scale" in recs[0]) == (precision == "fp16")  # GradScaler with fp16 only
    assert (C.load_checkpoint(out)["scaler"] is not None) == (precision == "fp16")


def test_demo_end_to_end(tmp_path):
    """python -m nearl.train --max-steps 3 --out tmp, then python -m nearl.evaluate on it."""
    env = {**os.environ, "NEARL_DEMO_DIR": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tmp"
    r = subprocess.run([sys.executable, "-m", "nearl.train", "--max-steps", "3", "--out", str(out),
                        "--workers", "0", "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RANDOM" in r.stdout and "NEARL-Tiny" in r.stdout
    assert (out / "last.pt").is_file() and (out / "curves.png").is_file()
    r = subprocess.run([sys.executable, "-m", "nearl.evaluate", "--checkpoint", str(out), "--out",
                        str(tmp_path / "eval"), "--workers", "0", "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["task"] == "retrieval" and res["split"] == "test"
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"} <= set(res["metrics"])
    assert "| i2t_R@1 |" in (tmp_path / "eval" / "results.md").read_text()
