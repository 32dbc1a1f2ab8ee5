"""open_clip configurations whose towers a NEARL layer steps as it steps a ViT: timm Eva image towers
(EVA01, EVA02, PE-Core: RoPE, SwiGLU, attention pooling; nearl/towers/timm_eva.py), timm
VisionTransformerRelPos (nearl/towers/timm_relpos.py) and CoCa's text tower, a class token appended
at the end (nearl/towers/open_clip_coca_text.py). Each on a shrunk copy of its open_clip config
(tests/tiny_families.py), random weights, offline."""
import numpy as np
import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.towers import tower_of
from model_helpers import (assert_every_parameter_learns_and_backbone_stays, assert_fused_matches_reference,
                           perturb_adapters)
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
from tiny_families import register

# open_clip config -> (vision tower type, text tower type), by class name
FAMILIES = {
    "EVA02-B-16": ("TimmEva", "OpenClipText"),  # RoPE, SwiGLU with its inner norm, token pooling
    "EVA01-g-14": ("TimmEva", "OpenClipText"),  # no RoPE, plain MLP
    "PE-Core-B-16": ("TimmEva", "OpenClipText"),  # timm's AttentionRope, MAP attention pooling
    "PE-Core-T-16-384": ("TimmEva", "OpenClipText"),
    "vit_relpos_medium_patch16_cls_224": ("TimmRelPos", "OpenClipText"),  # open_clip CLIP, inline text
    "coca_ViT-B-32": ("OpenClipVision", "CoCaText"),  # attentional pooling over the image tokens
    "coca_base": ("OpenClipVision", "CoCaText"),
}
ONE_EACH = ["EVA02-B-16", "PE-Core-B-16", "vit_relpos_medium_patch16_cls_224", "coca_ViT-B-32"]


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    return {name: register(folder, name) for name in FAMILIES}


def build(names, name, **config):
    torch.manual_seed(0)
    return nearl.build(names[name], **config)


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"][:n]
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(captions)


def frozen(model, images, tokens):
    """The backbone's own features, not normalised (CoCa normalises by default)."""
    bb = model.backbone
    return bb.encode_image(images, normalize=False), bb.encode_text(tokens, normalize=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_factory_picks_the_tower_types_and_a_fresh_model_is_the_frozen_backbone(names, name):
    model = build(names, name)
    assert [type(model.tower(k)).__name__ for k in ("vision", "text")] == list(FAMILIES[name])
    assert model.tower("vision").depth == model.tower("text").depth == 2
    images, tokens = batch(model)
    with torch.no_grad():
        image, text = frozen(model, images, tokens)
        assert torch.equal(model.encode_image(images), image)
        assert torch.equal(model.encode_text(tokens), text)
    # with autograd on as well, on both sides (nn.MultiheadAttention has a no-grad fast path)
    out = model(images.requires_grad_(), tokens)
    image, text = frozen(model, images, tokens)
    assert torch.equal(out.image_features, image) and torch.equal(out.text_features, text)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stepping_and_splitting_the_blocks_reproduce_the_backbone(names, name):
    model = build(names, name)
    images, tokens = batch(model)
    image, text = frozen(model, images, tokens)
    with torch.no_grad():
        for kind, inputs, want in (("vision", images, image), ("text", tokens, text)):
            tower = model.tower(kind)
            x, extra = tower.stem(inputs)
            for k in range(tower.depth):
                parts = tower.prenorm_parts(k)
                y = x + parts.attention(x, extra)
                split = y + parts.mlp(parts.norm2(y))
                plain = tower.block(k, x, extra)
                assert torch.equal(tower.adapted_block(k, x, extra, lambda h: h, lambda h: 0 * h), plain)
                torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)
                x = plain
            assert torch.equal(tower.head(x, inputs), want), kind
    assert model.tower("vision").output_dim() == 32


@pytest.mark.parametrize("name,timm_name", [("EVA02-B-16", "vit_base_patch16_rope_mixed_224"),
                                            ("vit_relpos_medium_patch16_cls_224", "vit_srelpos_medium_patch16_224")])
def test_mixed_rope_and_a_shared_relative_bias_step_as_timm_runs_them(tmp_path, name, timm_name):
    """timm trunks no open_clip config names yet: one RoPE embedding per block (mixed), and one
    relative position bias for all blocks, both handed to the blocks by the stem."""
    torch.manual_seed(0)
    model = nearl.build(register(tmp_path, name, timm_name))
    tower = model.tower("vision")
    images, tokens = batch(model)
    with torch.no_grad():
        x, extra = tower.stem(images)
        assert extra is not None
        if "mixed" in timm_name:
            assert tower.trunk.rope_mixed and extra.shape[0] == tower.depth  # one per block
        for k in range(tower.depth):
            parts = tower.prenorm_parts(k)
            y = x + parts.attention(x, extra)
            split, x = y + parts.mlp(parts.norm2(y)), tower.block(k, x, extra)
            torch.testing.assert_close(split, x, rtol=1e-5, atol=1e-6)
        assert torch.equal(tower.head(x, images), frozen(model, images, tokens)[0])
        assert torch.equal(model.encode_image(images), frozen(model, images, tokens)[0])


@pytest.mark.parametrize("name", ONE_EACH)
def test_fused_and_reference_agree(names, name):
    model = perturb_adapters(build(names, name))
    images, tokens = batch(model, n=2)
    with torch.no_grad():  # moved off their init, the NEARL layers change both towers' features
        image, text = frozen(model, images, tokens)
        assert not torch.allclose(model.encode_image(images), image)
        assert not torch.allclose(model.encode_text(tokens), text)
    assert_fused_matches_reference(model, images, tokens)


@pytest.mark.parametrize("name", ONE_EACH)
def test_every_nearl_parameter_gets_a_gradient_and_the_backbone_stays_as_it_was(names, name):
    model = build(names, name, orth="soft").train()
    assert set(model.adapters) == {"vision", "text"}
    assert_every_parameter_learns_and_backbone_stays(model, *batch(model))


@pytest.mark.parametrize("name", ONE_EACH)
def test_alta_puts_its_adapters_in_the_blocks_and_fresh_is_the_frozen_backbone(names, name):
    torch.manual_seed(0)
    model = MT.build_method("alta", names[name], seed=0)
    images, tokens = batch(model)
    with torch.no_grad():
        image, text = frozen(model, images, tokens)
        assert torch.equal(model.encode_image(images), image)
        assert torch.equal(model.encode_text(tokens), text)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"retrieval": make_manifest(root / "data", n_train=8, n_val=4),
            "classification": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("method,task", [("nearl", "retrieval"), ("alta", "retrieval"), ("clip-adapter", "retrieval"),
                                         ("coop", "classification"), ("linear-probe", "classification"),
                                         ("zeroshot", "retrieval")])
@pytest.mark.parametrize("name", ONE_EACH)
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


@pytest.mark.parametrize("correct_cls_mask", [False, True])
def test_the_coca_text_mask_is_what_its_class_token_sees(names, correct_cls_mask):
    """The appended class token is pooled; the NEARL layer reads what it attends to: the text up to
    the padding, and one key for the class token (first in released CoCa weights' legacy mask)."""
    model = build(names, "coca_ViT-B-32")
    model.backbone.text.correct_cls_mask = correct_cls_mask
    tower = model.tower("text")
    tokens = model.tokenizer()(["ct", "a much longer caption about a chest radiograph"])
    assert tower.context_length == tokens.shape[1] == 16  # the tokenizer's context, without the class token
    valid = tower.valid_mask(tokens)
    x, attn_mask = tower.stem(tokens)
    assert valid.shape == x.shape[:2] == (2, 17)
    heads = attn_mask.shape[0] // 2
    sees = attn_mask.view(2, heads, 17, 17)[:, :, -1] == 0  # the class token's row, per head
    assert torch.equal(sees, valid[:, None].expand_as(sees))
    assert valid[:, 0].all() and valid[:, -1].tolist() == [correct_cls_mask] * 2 and (valid.sum(1) < 17).all()


def test_a_timm_trunk_without_a_tower_type_is_named_once(names):
    """The three timm tower types say the same of a trunk none of them steps; the factory says it once."""
    backbone = build(names, "EVA02-B-16").backbone
    backbone.visual.trunk = torch.nn.Sequential()
    with pytest.raises(ValueError) as err:
        tower_of(backbone, "vision")
    said = "a TimmModel around timm's Sequential, a trunk no tower type steps (they step ConvNeXt, Eva, FastVit, " \
        "SwinTransformer, VisionTransformer, VisionTransformerRelPos);"
    assert str(err.value).count(said) == 1
