"""The transformers CLIP family beyond CLIPModel / SiglipModel (MetaCLIP 2, OWL-ViT, OWLv2, ChineseCLIP,
AltCLIP, SigLIP 2, BLIP; nearl/towers/transformers_backbone.py, hf_clip_*.py, hf_bert_text.py), offline
on tiny folders (tests/tiny_clip_family.py); ALIGN and GroupViT are refused with their reason."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nearl
from nearl import methods as MT
from nearl.errors import UserError
from nearl.model.nearl_clip import create_backbone
from nearl.store.checkpoint import load_checkpoint
from nearl.towers import HFBertText, HFCLIPText, HFCLIPVision
from nearl.towers import transformers_backbone as TB
from model_helpers import assert_fused_matches_reference, assert_is_the_frozen_backbone, perturb_adapters
from train_helpers import FAST, make_manifest, run, train_losses
import tiny_clip_family as TF

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAPTIONS = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"]
BERT_TEXT = ("chinese_clip", "altclip", "blip")


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-family")
    return {kind: TF.write(root / kind, kind) for kind in TF.KINDS}


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(CAPTIONS[:n])


def own_features(hf, method, **inputs):
    out = getattr(hf, method)(**inputs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # 5.x returns the model output


@pytest.mark.parametrize("kind", TF.KINDS)
def test_a_fresh_model_is_the_checkpoints_own_features_bit_for_bit(names, kind):
    model = nearl.build(names[kind])
    text_type = HFBertText if kind in BERT_TEXT else HFCLIPText
    assert isinstance(model.tower("vision"), HFCLIPVision) and isinstance(model.tower("text"), text_type)
    images, tokens = batch(model)
    assert tokens.shape == (3, TF.CONTEXT)
    backbone, hf = model.backbone, model.backbone.hf
    image_inputs, mask = backbone.image_inputs(images), backbone.text_mask(tokens)
    with torch.no_grad():
        out = model(images, tokens)
        assert torch.equal(out.image_features, own_features(hf, "get_image_features", **image_inputs))
        if kind != "chinese_clip" or hf.text_model.pooler is not None:  # 4.x's reads a pooler it lacks
            assert torch.equal(out.text_features, own_features(hf, "get_text_features", input_ids=tokens,
                                                                attention_mask=mask))
        assert torch.equal(out.text_features, backbone.encode_text(tokens))
        own = hf(input_ids=tokens, attention_mask=mask, **image_inputs)  # and its own forward, normalised there
        torch.testing.assert_close(F.normalize(out.text_features, dim=-1), own.text_embeds, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(F.normalize(out.image_features, dim=-1), own.image_embeds, rtol=1e-6, atol=1e-6)
    assert out.logit_scale == hf.logit_scale.exp().reshape(())
    assert (out.logit_bias is None) == (kind != "siglip2")
    assert model.tower("text").output_dim() == model.tower("vision").output_dim() == out.image_features.shape[-1]


@pytest.mark.parametrize("kind", BERT_TEXT)
def test_bert_style_text_sees_what_is_not_padding(names, kind):
    model = nearl.build(names[kind])
    tower = model.tower("text")
    _, tokens = batch(model)
    pad = TF.specials(kind)["pad_token_id"]
    assert (tokens == pad).any() and torch.equal(tower.valid_mask(tokens), tokens != pad)
    assert tower.context_length == TF.CONTEXT and tower.context_at == 1
    short = tokens[2:, :int((tokens[2] != pad).sum())]  # the last caption without its padding
    with torch.no_grad():  # under the padding mask, the padding changes nothing
        torch.testing.assert_close(model.encode_text(tokens)[2:], model.backbone.encode_text(short), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", BERT_TEXT)
def test_alta_adds_to_the_post_norm_bert_layers_where_their_branches_are(names, kind):
    """x1 = A1(attention(x)) (its LayerNorm inside); LN2(x1 + dense(intermediate(x1)) + A2(x1))."""
    tower = MT.build_method("alta", names[kind]).tower("text")
    layer, seen = tower.blocks[0], {}
    with torch.no_grad():
        x, args = tower.stem(batch(nearl.build(names[kind]))[1])
        hook = layer.attention.register_forward_hook(  # a tuple in 4.x, the tensor in some 5.x classes
            lambda m, a, out: seen.update(a=out[0] if isinstance(out, tuple) else out))
        plain = tower.block(0, x, args)
        hook.remove()
        assert torch.equal(tower.adapted_block(0, x, args, lambda h: h, lambda h: 0 * h), plain)
        got = tower.adapted_block(0, x, args, lambda h: h + 1.0, lambda h: 0.5 * h)
        x1 = seen["a"] + 1.0
        want = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x1)) + 0.5 * x1 + x1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_owl_text_pools_the_highest_id_and_metaclip_2_the_first_end_token(names):
    owl = nearl.build(names["owlvit"]).tower("text")
    tokens = torch.tensor([[2, 9, len(TF.vocab("owlvit")) - 1, 0], [2, 30, 9, 0]])
    assert owl.end_of_text(tokens).tolist() == [2, 1]  # no end token in the second row: its highest id
    meta = nearl.build(names["metaclip_2"]).tower("text")
    assert meta.end_of_text(torch.tensor([[2, 9, 3, 3, 0], [2, 50, 9, 3, 0]])).tolist() == [2, 3]


def test_siglip2_takes_square_images_as_its_processor_patches_them(names):
    from PIL import Image
    from transformers import Siglip2ImageProcessor
    model = nearl.build(names["siglip2"])
    assert model.tower("vision").image_size == (32, 32)
    assert model.backbone.preprocess_cfg["size"] == 32 and model.backbone.preprocess_cfg["resize_mode"] == "squash"
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    want = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)(Image.fromarray(rgb), return_tensors="pt")
    image = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    got = TB.naflex_inputs(image[None], 8)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(got["pixel_attention_mask"].long(), want["pixel_attention_mask"].long())  # all ones
    assert got["pixel_attention_mask"].all() and torch.equal(got["spatial_shapes"], want["spatial_shapes"])


@pytest.mark.parametrize("kind", TF.KINDS)
def test_fused_and_reference_agree_and_alta_starts_frozen(names, kind):
    torch.manual_seed(0)
    model = nearl.build(names[kind]).to(DEV)
    perturb_adapters(model)
    assert_fused_matches_reference(model, *(t.to(DEV) for t in batch(model, n=2)))
    alta = MT.build_method("alta", names[kind])
    assert_is_the_frozen_backbone(alta, *batch(alta, n=2))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("clip-family-data") / "data", n_train=4, n_val=2)


@pytest.mark.parametrize("kind", TF.KINDS)
def test_nearl_trains_resumes_and_restores(tmp_path, names, manifest, kind):
    common = ["--method", "nearl", "--task", "retrieval", "--model", names[kind], "--data", manifest,
              "--batch-size", 4, "--warmup", 1, "--eval-every", 0, "--out", tmp_path / "run", *FAST]
    run(common + ["--max-steps", 2])
    assert run(common + ["--max-steps", 3, "--resume", tmp_path / "run"])["step"] == 3
    assert all(np.isfinite(train_losses(tmp_path / "run")[0]))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["model_name"] == names[kind]
    restored = MT.build_from_checkpoint(ckpt)
    for k, v in restored.trainable_state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


@pytest.mark.parametrize("kind,reason", [("align", "EfficientNet"), ("groupvit", "grouping blocks")])
def test_align_and_groupvit_are_refused_with_their_reason(tmp_path, kind, reason):
    TF.config(kind).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"is a '{kind}' model: .*{reason}.*not a sequence of residual blocks "
                                        "over a fixed token set"):
        create_backbone("transformers:" + str(tmp_path))
