"""Training on CPU with the tiny backbone: the loss falls, resume is exact, classification runs,
the demo command works end to end. Data are a few generated PNGs + a CSV manifest in tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import numpy as np
import pytest
import torch

from nearl import argtypes as A
from nearl.store import checkpoint as C
from nearl import methods as MT
from nearl.training.distributed import ShardedBatchSampler
from nearl.training.schedule import WarmupCosine
from train_helpers import (_Interrupt, _one_thread, _StopAt, FAST, make_image_folder, make_manifest,  # noqa: F401
                           run, train_losses)


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
