"""ALTA's multi-view input: the manifest reader, the dataset, the mean over present views only, the
zero-init identity for a single frontal view, and training with --multiview through nearl.train."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.methods.alta import SLOT_TIME, SLOT_VIEW, adapted_block
from nearl.methods.multiview import VIEW_SLOTS, MultiViewDataset, read_multiview
from train_helpers import _one_thread, FAST, _image, run, train_losses

COLS = ["image", "lateral", "prior", "prior_lateral"]


def make_multiview(root, n_train=8, n_val=4, seed=0):
    """root/studies.csv: every study has a frontal image; laterals on even rows, priors on every third,
    one lateral names a file that does not exist, one prior_lateral is undecodable."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i, split in enumerate(["train"] * n_train + ["val"] * n_val):
        c = colours[i % 4]
        row = {"image": f"f{i}.png", "lateral": "", "prior": "", "prior_lateral": "",
               "caption": json.dumps([f"a {c} study {i}", f"{c} chest film {i}"]), "split": split}
        _image(root / f"f{i}.png", c, rng)
        if i % 2 == 0:
            _image(root / f"l{i}.png", c, rng)
            row["lateral"] = f"l{i}.png"
        if i % 3 == 0:
            _image(root / f"p{i}.png", c, rng)
            _image(root / f"pl{i}.png", c, rng)
            row["prior"], row["prior_lateral"] = f"p{i}.png", f"pl{i}.png"
        rows.append(row)
    rows[1]["lateral"] = "does_not_exist.png"
    (root / "pl3.png").write_bytes(b"not an image")
    path = root / "studies.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLS, "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_reader_and_dataset(tmp_path):
    path = make_multiview(tmp_path)
    records = read_multiview(path)
    assert len(records) == 12 and all(len(r.meta["views"]) == len(VIEW_SLOTS) == 4 for r in records)
    views = [r.meta["views"] for r in records]
    assert views[0] == [tmp_path / n for n in ("f0.png", "l0.png", "p0.png", "pl0.png")]
    assert views[1] == [tmp_path / "f1.png", None, None, None]  # lateral file missing: absent
    assert views[2][1] == tmp_path / "l2.png" and views[2][2:] == [None, None]
    assert "lateral" not in records[0].meta  # consumed into meta["views"]

    tok = MT.build_method("zeroshot", "NEARL-Tiny").tokenizer()
    tf = MT.build_method("zeroshot", "NEARL-Tiny").image_transform(False)
    ds = MultiViewDataset(records, tf, tok, train=False)
    x, mask, tokens = ds[0]
    assert x.shape == (4, 3, 32, 32) and mask.tolist() == [True, True, True, True] and tokens.shape == (16,)
    x, mask, _ = ds[3]  # lateral absent (odd row); prior present; prior_lateral undecodable -> absent
    assert mask.tolist() == [True, False, True, False]
    assert torch.equal(x[1], torch.zeros_like(x[1])) and torch.equal(x[3], torch.zeros_like(x[3]))
    assert not torch.equal(x[2], torch.zeros_like(x[2]))
    with pytest.raises(ValueError, match="give 4 view columns"):
        read_multiview(path, columns=["image", "lateral"])


def _views(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 3, 32, 32, generator=g)


def test_single_frontal_view_with_zero_init_is_the_single_view_model():
    multi = MT.build_method("alta", "NEARL-Tiny", seed=2, multiview=True)
    single = MT.build_method("alta", "NEARL-Tiny", seed=2)
    views = _views()
    frontal_only = torch.tensor([[True, False, False, False]] * 3)
    with torch.no_grad():
        ref = single.encode_image(views[:, 0])
        assert torch.equal(multi.encode_image(views, view_mask=frontal_only), ref)
        assert torch.equal(multi.encode_image(views[:, :1]), ref)  # (B, 1, 3, H, W), no mask
        assert torch.equal(multi.encode_image(views[:, 0]), ref)  # evaluation: one frontal image
        assert torch.equal(ref, single.backbone.encode_image(views[:, 0]))
        # a non-zero frontal/current embedding does change it (it is really added; not a constant
        # vector, which every LayerNorm after it would remove)
        multi.view_embed[0].add_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(multi.encode_image(views, view_mask=frontal_only), ref, atol=1e-4)


def test_missing_view_is_left_out_of_the_mean():
    model = MT.build_method("alta", "NEARL-Tiny", seed=5, multiview=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every learnable tensor non-zero, embeddings included
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    views = _views()
    mask = torch.tensor([[True, False, True, True],  # lateral missing
                         [True, True, True, True],
                         [True, True, False, False]])
    with torch.no_grad():
        got = model.encode_image(views, view_mask=mask)
        # a missing view's pixels do not matter, even NaN
        poisoned = views.clone()
        poisoned[0, 1] = float("nan")
        poisoned[2, 2:] = 1e6
        assert torch.equal(model.encode_image(poisoned, view_mask=mask), got)
        # by hand: each present view alone with its slot's embeddings, pooled, averaged, projected
        tower, proj = model.tower("vision"), model.backbone.visual.proj
        for b in range(3):
            pooled = []
            for v in range(4):
                if not mask[b, v]:
                    continue
                x, _ = tower.stem(views[b, v][None])
                x = x + model.view_embed[SLOT_VIEW[v]] + model.time_embed[SLOT_TIME[v]]
                for k in range(tower.depth):
                    x = adapted_block(tower, k, x, model.adapters["vision"][k], 0.5)
                pooled.append(model.backbone.visual._pool(x)[0])
            expected = torch.cat(pooled).mean(dim=0, keepdim=True) @ proj
            torch.testing.assert_close(got[b:b + 1], expected, rtol=1e-5, atol=1e-5)
        # and the lateral embedding touches only samples that have a lateral view
        shift = torch.randn(64, generator=torch.Generator().manual_seed(3))
        model.view_embed[1].add_(shift)
        moved = model.encode_image(views, view_mask=mask)
    for b in range(3):  # each sample has a lateral-type view (sample 0: its prior lateral)
        assert not torch.allclose(moved[b], got[b], atol=1e-4), b
    same = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        a = model.encode_image(views[:1], view_mask=same)
        model.view_embed[1].sub_(shift)
        b = model.encode_image(views[:1], view_mask=same)
    assert torch.equal(a, b)  # no lateral-type view present: the lateral embedding is not used
    with pytest.raises(ValueError, match="no view at all"):
        model.encode_image(views, view_mask=torch.zeros(3, 4, dtype=torch.bool))


def test_multiview_training_run(tmp_path):
    path = make_multiview(tmp_path / "mv")
    out = tmp_path / "run"
    summary = run(["--method", "alta", "--multiview", "--model", "NEARL-Tiny", "--data", path,
                   "--batch-size", 8, "--max-steps", 6, "--warmup", 1, "--lr", 3e-3, "--eval-every", 0,
                   "--out", out, *FAST])
    assert summary["step"] == 6
    losses, recs = train_losses(out)
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    assert "mean_recall" in recs[-1]  # validation on the frontal images
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["multiview"] is True
    assert ckpt["model"]["view_embed"].abs().sum() > 0 and ckpt["model"]["time_embed"].abs().sum() > 0
    model = MT.build_from_checkpoint(ckpt)
    assert model.num_trainable_parameters() == 18_192 + 4 * 64  # + 2 view and 2 time embeddings of width 64
    with pytest.raises(ValueError, match="--multiview is an option of method 'alta'"):
        run(["--method", "nearl", "--multiview", "--model", "NEARL-Tiny", "--data", path, "--max-steps", 1,
             "--out", tmp_path / "x", *FAST])
