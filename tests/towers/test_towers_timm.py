"""The timm tower type (nearl/towers/timm_vision.py): open_clip's TimmModel around a timm
VisionTransformer, BiomedCLIP's image tower, on a tiny offline configuration (tests/tiny_timm.py)."""
import numpy as np
import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.towers import TimmVision, tower_of
from model_helpers import assert_fused_matches_reference, assert_is_the_frozen_backbone, perturb_adapters
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
from tiny_timm import register

NAME = register()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"][:n]
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(captions)


def test_the_factory_picks_the_timm_tower_and_a_fresh_model_is_the_frozen_clip():
    model = nearl.build(NAME)
    assert isinstance(model.tower("vision"), TimmVision) and model.tower("vision").depth == 2
    images, tokens = batch(model)
    assert_is_the_frozen_backbone(model, images, tokens)
    images.requires_grad_()
    assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))


def test_stepping_and_splitting_timm_blocks_reproduce_timm():
    model = nearl.build(NAME)
    tower = model.tower("vision")
    images, _ = batch(model)
    with torch.no_grad():
        x, mask = tower.stem(images)
        assert mask is None and x.shape == (3, 17, 64)  # class token + 16 patches
        for k in range(tower.depth):
            parts = tower.prenorm_parts(k)
            y = x + parts.attention(x, None)
            split = y + parts.mlp(parts.norm2(y))
            x = tower.block(k, x)
            torch.testing.assert_close(split, x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tower.head(x, images), model.backbone.encode_image(images), rtol=1e-5, atol=1e-6)
    assert tower.output_dim() == 32 and tower.image_size == (32, 32)


def test_fused_and_reference_agree_on_the_timm_tower():
    torch.manual_seed(0)
    model = nearl.build(NAME).to(DEV)
    perturb_adapters(model)
    assert_fused_matches_reference(model, *(t.to(DEV) for t in batch(model, n=2)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    return {"manifest": make_manifest(root / "data", n_train=8, n_val=4),
            "folder": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("method,task", [("nearl", "retrieval"), ("alta", "retrieval"), ("clip-adapter", "retrieval"),
                                         ("coop", "classification"), ("linear-probe", "classification"),
                                         ("zeroshot", "retrieval")])
def test_every_method_trains_and_restores_on_the_timm_tower(tmp_path, data, method, task):
    src = data["manifest"] if task == "retrieval" else data["folder"]
    summary = run(["--method", method, "--task", task, "--model", NAME, "--data", src, "--batch-size", 4,
                   "--max-steps", 2, "--warmup", 1, "--eval-every", 0, "--out", tmp_path / method, *FAST])
    assert summary["method"] == method
    losses, _ = train_losses(tmp_path / method)
    assert all(np.isfinite(losses))
    ckpt = load_checkpoint(tmp_path / method)
    restored = MT.build_from_checkpoint(ckpt)
    for k, v in restored.trainable_state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    if method == "alta":  # its adapters sit inside timm's blocks: fresh, it is the frozen CLIP
        fresh = MT.build_method("alta", NAME, seed=0)
        images, _ = batch(fresh)
        with torch.no_grad():
            assert torch.equal(fresh.encode_image(images), fresh.backbone.encode_image(images))


def test_a_timm_trunk_that_is_not_a_vit_is_named():
    backbone = nearl.build(NAME).backbone
    backbone.visual.trunk = torch.nn.Sequential()
    with pytest.raises(ValueError, match="TimmModel around timm's Sequential, a trunk no tower type steps "
                                         r"\(they step ConvNeXt, .*VisionTransformer"):
        tower_of(backbone, "vision")
