"""open_clip's convolutional and hierarchical image towers (nearl/towers/feature_map_base.py): the
last stage's blocks stepped on the feature map viewed as tokens (B, H*W, C). ModifiedResNet (RN50...),
timm ConvNeXt, Swin and FastViT (MobileCLIP), each on a shrunk copy of its open_clip config
(tests/tiny_families.py: 3 x 3 maps, Swin's 6 x 6 with shifted windows), random weights, offline."""
import numpy as np
import open_clip
import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from model_helpers import (assert_every_parameter_learns_and_backbone_stays, assert_fused_matches_reference,
                           perturb_adapters)
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
from tiny_families import register

# open_clip config -> (vision tower type, adapted blocks, their width d, tokens N)
FAMILIES = {
    "RN50": ("OpenClipResNet", 2, 128, 9),  # layer4[0] widens and halves the map: in the stem
    "convnext_base": ("TimmConvNeXt", 3, 40, 9),  # channels-last maps between its blocks
    "convnext_large_d": ("TimmConvNeXt", 3, 40, 9),  # timm_proj "mlp"
    "swin_base_patch4_window7_224": ("TimmSwin", 3, 64, 36),  # NHWC, shifted windows
    "MobileCLIP-S1": ("TimmFastViT", 3, 64, 9),  # fastvit_mci1 (MobileCLIP2-S0, -S2: mci0, mci2)
    "MobileCLIP2-S3": ("TimmFastViT", 3, 64, 9),  # fastvit_mci3: five stages, LayerNorm2d (open_clip >= 3.2)
}
ONE_EACH = ["RN50", "convnext_base", "swin_base_patch4_window7_224", "MobileCLIP-S1"]


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv")
    return {name: register(folder, name) for name in FAMILIES if open_clip.get_model_config(name) is not None}


def build(names, name, **config):
    if name not in names:
        pytest.skip(f"open_clip {open_clip.__version__} has no {name} config")
    torch.manual_seed(0)
    return nearl.build(names[name], **config)


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"][:n]
    return torch.randn(n, 3, *model.tower("vision").image_size, generator=g), model.tokenizer()(captions)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_factory_picks_the_tower_and_a_fresh_model_is_the_frozen_backbone(names, name):
    model = build(names, name)
    tower = model.tower("vision")
    kind, depth, width, tokens = FAMILIES[name]
    assert (type(tower).__name__, tower.depth, tower.width) == (kind, depth, width)
    assert sorted(int(k) for k in model.adapters["vision"].layers) == list(range(1, depth + 1))
    images, text = batch(model)
    x, size = tower.stem(images)
    assert x.shape == (3, tokens, width) and size[0] * size[1] == tokens
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        model.fused = False  # the reference layer returns tokens in x's strides, the fused one contiguous
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        model.fused = True
    out = model(images.requires_grad_(), text)  # with autograd too
    assert torch.equal(out.image_features, model.backbone.encode_image(images))
    # grad checkpointing re-runs the blocks with the stem's (H, W) handed back
    model.set_grad_checkpointing(True)
    model.train()
    assert torch.equal(model(images, text).image_features, model.backbone.encode_image(images))
    assert tower.output_dim() == 32


@pytest.mark.parametrize("name", ONE_EACH)
def test_stepping_the_blocks_reproduces_the_backbone(names, name):
    model = build(names, name)
    tower = model.tower("vision")
    images, _ = batch(model)
    with torch.no_grad():
        x, size = tower.stem(images)
        for k in range(tower.depth):
            x = tower.block(k, x, size)
        assert torch.equal(tower.head(x, images), model.backbone.encode_image(images))
        assert torch.equal(tower.head(x, None), model.backbone.encode_image(images))  # the grid from image_size


@pytest.mark.parametrize("name", ["RN50", "convnext_base", "MobileCLIP-S1"])
def test_a_block_gets_the_memory_format_the_backbone_gives_it_whatever_the_tokens_strides(names, name):
    """A convolution's bits can depend on its input's memory format (ConvNeXt's blocks hand on channels-last
    maps, its downsampling a contiguous one): tokens in any strides step as the backbone runs."""
    model = build(names, name)
    tower = model.tower("vision")
    images, _ = batch(model)
    with torch.no_grad():
        x, size = tower.stem(images)
        for k in range(tower.depth):
            odd = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel-major strides
            x = tower.block(k, odd if k % 2 else x, size)
        odd = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(tower.head(odd, images), model.backbone.encode_image(images))


def test_the_swin_blocks_adapted_include_shifted_windows(names):
    blocks = build(names, "swin_base_patch4_window7_224").tower("vision").blocks
    assert [tuple(b.shift_size) for b in blocks] == [(0, 0), (1, 1), (0, 0)]


def lively(model):
    """Random weights leave ModifiedResNet's and FastViT's maps nearly constant (zero-init last
    BatchNorms, layer scale 1e-5), every token alike, so the query update's key gradient cancels and is
    ill-conditioned in float32 on both paths (a 1% error against float64). Pretrained maps are not."""
    with torch.no_grad():
        for p in model.backbone.visual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", ONE_EACH)
def test_fused_and_reference_agree(names, name):
    model = perturb_adapters(lively(build(names, name)))
    images, tokens = batch(model, n=2)
    with torch.no_grad():  # moved off their init, the NEARL layers change the image features
        assert not torch.allclose(model.encode_image(images), model.backbone.encode_image(images))
    assert_fused_matches_reference(model, images, tokens)


@pytest.mark.parametrize("name", ONE_EACH)
def test_every_nearl_parameter_gets_a_gradient_and_the_backbone_stays_as_it_was(names, name):
    model = build(names, name, orth="soft").train()  # the backbone stays in eval mode: BatchNorm statistics kept
    assert_every_parameter_learns_and_backbone_stays(model, *batch(model))


@pytest.mark.parametrize("name", [n for n in ONE_EACH if not n.startswith("swin")])
def test_alta_refuses_convolutional_blocks_in_one_line(names, name):
    """ModifiedResNet's, ConvNeXt's and FastViT's blocks are no pre-norm attention + MLP pair."""
    with pytest.raises(ValueError, match=r"the vision tower \(open_clip .*\) cannot split its blocks into branches"):
        MT.build_method("alta", names[name], seed=0)


def test_alta_goes_into_swin_blocks_and_fresh_is_the_frozen_backbone(names):
    build(names, "swin_base_patch4_window7_224")  # skips where open_clip lacks it
    torch.manual_seed(0)
    model = MT.build_method("alta", names["swin_base_patch4_window7_224"], seed=0)
    tower = model.tower("vision")
    images, tokens = batch(model)
    with torch.no_grad():
        x, size = tower.stem(images)
        for k in range(tower.depth):
            parts = tower.prenorm_parts(k)
            y = x + parts.attention(x, size)
            split = y + parts.mlp(parts.norm2(y))
            plain = tower.block(k, x, size)
            assert torch.equal(tower.adapted_block(k, x, size, lambda h: h, lambda h: 0 * h), plain)
            torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)
            x = plain
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        assert torch.equal(model.encode_text(tokens), model.backbone.encode_text(tokens))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"retrieval": make_manifest(root / "data", n_train=8, n_val=4),
            "classification": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("name,method,task", [
    ("RN50", "nearl", "retrieval"), ("RN50", "nearl", "classification"), ("RN50", "clip-adapter", "retrieval"),
    ("RN50", "coop", "classification"), ("RN50", "linear-probe", "classification"), ("RN50", "zeroshot", "retrieval"),
    ("swin_base_patch4_window7_224", "alta", "retrieval")])  # ALTA refuses the convolutional blocks
def test_every_method_trains_and_restores(tmp_path, names, data, name, method, task):
    summary = run(["--method", method, "--task", task, "--model", names[name], "--data", data[task],
                   "--batch-size", 4, "--max-steps", 2, "--warmup", 1, "--eval-every", 0, "--out", tmp_path, *FAST])
    assert summary["method"] == method
    losses, _ = train_losses(tmp_path)
    assert all(np.isfinite(losses))
    ckpt = load_checkpoint(tmp_path)
    restored = MT.build_from_checkpoint(ckpt)
    for k, v in restored.trainable_state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
