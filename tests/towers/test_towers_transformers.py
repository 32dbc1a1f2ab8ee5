"""Hugging Face transformers CLIPModel / SiglipModel checkpoints ("transformers:<repo or folder>",
nearl/towers/transformers_backbone.py, nearl/towers/hf_clip_*.py), offline on tiny folders
(tests/tiny_transformers.py), on every supported path; the hub path through mocks."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nearl
from nearl import evaluate as E
from nearl import methods as MT
from nearl.towers import transformers_backbone as TB
from nearl.store.checkpoint import load_checkpoint
from nearl.errors import UserError
from nearl.model.nearl_clip import create_backbone
from nearl.towers import HFCLIPText, HFCLIPVision
from model_helpers import (adapted_first_block, assert_fused_matches_reference, assert_is_the_frozen_backbone,
                              perturb_adapters)
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
import tiny_transformers

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAPTIONS = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"]
KINDS = ("clip", "siglip")


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    return {kind: tiny_transformers.write(root / kind, kind) for kind in KINDS}


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(CAPTIONS[:n])


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_model_is_the_frozen_checkpoint_bit_for_bit(names, kind):
    model = nearl.build(names[kind])
    assert isinstance(model.tower("vision"), HFCLIPVision) and isinstance(model.tower("text"), HFCLIPText)
    images, tokens = batch(model)
    assert tokens.shape == (3, tiny_transformers.CONTEXT[kind]) and (tokens == 0).any()  # padded
    hf = model.backbone.hf
    with torch.no_grad():
        out = model(images, tokens)
        assert torch.equal(out.text_features, model.backbone.encode_text(tokens))
        assert torch.equal(out.image_features, model.backbone.encode_image(images))
        # and that is the transformers model's own output (normalised there), as its users call it
        own = hf(input_ids=tokens, pixel_values=images)
        torch.testing.assert_close(F.normalize(out.text_features, dim=-1), own.text_embeds, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(F.normalize(out.image_features, dim=-1), own.image_embeds, rtol=1e-6, atol=1e-6)
    assert out.logit_scale == hf.logit_scale.exp().reshape(())
    assert (out.logit_bias is None) == (kind == "clip")


def test_clip_text_pools_the_end_token_and_masks_what_follows(names):
    model = nearl.build(names["clip"])
    tower = model.tower("text")
    _, tokens = batch(model)
    end = (tokens == 3).int().argmax(-1)
    assert torch.equal(tower.end_of_text(tokens), end)
    want = torch.arange(tokens.shape[1])[None] <= end[:, None]
    assert torch.equal(tower.valid_mask(tokens), want)
    with torch.no_grad():  # causal: what follows the end token changes nothing the head pools
        other = tokens.clone()
        other[~want] = 7
        assert torch.equal(model.encode_text(other), model.encode_text(tokens))
    tower.eos_id = 2  # configs from before transformers' fix pool at the highest id, as transformers does
    assert torch.equal(tower.end_of_text(tokens), tokens.argmax(-1))
    assert tower.output_dim() == 24 and model.tower("vision").output_dim() == 24


def test_siglip_text_sees_every_position_and_pools_the_last(names):
    model = nearl.build(names["siglip"])
    tower = model.tower("text")
    _, tokens = batch(model)
    assert tower.valid_mask(tokens) is None and tower.context_at == 0
    with torch.no_grad():  # bidirectional, no padding mask (as SigLIP was trained): padding counts
        other = tokens.clone()
        other[tokens == 0] = 7
        assert not torch.equal(model.encode_text(other), model.encode_text(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_and_reference_agree_on_both_towers(names, kind):
    torch.manual_seed(0)
    model = nearl.build(names[kind]).to(DEV)
    perturb_adapters(model)
    assert_fused_matches_reference(model, *(t.to(DEV) for t in batch(model, n=2)))


@pytest.mark.parametrize("kind", KINDS)
def test_alta_adapters_in_the_pre_norm_layers(names, kind):
    """x1 = A1(x + attn(LN1 x)); h = LN2 x1; x1 + mlp(h) + A2(h); zero adapters: the frozen model."""
    fresh = MT.build_method("alta", names[kind])
    images, tokens = batch(fresh)
    assert_is_the_frozen_backbone(fresh, images, tokens)
    tower = fresh.tower("text")
    layer = tower.blocks[0]
    x, attended, got = adapted_first_block(tower, tokens, layer.self_attn)
    with torch.no_grad():
        x1 = x + attended + 1.0
        h = layer.layer_norm2(x1)
        want = x1 + layer.mlp(h) + 0.5 * h
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_coop_context_goes_where_the_tokenizer_puts_the_first_word(names, kind):
    """CLIP: after <start>; SigLIP (no start token): first. With the placeholder's own embedding as
    the context, the prompt is the plain text."""
    model = MT.build_method("coop", names[kind], n_ctx=4)
    tokens = model.class_prompt_tokens(["effusion", "normal"])
    at = 1 if kind == "clip" else 0
    x_id = tiny_transformers.VOCAB.index("x")
    assert (tokens[:, at:at + 4] == x_id).all() and (kind == "siglip" or (tokens[:, 0] == 2).all())
    embedding = model.backbone.hf.text_model.embeddings.token_embedding
    with torch.no_grad():
        before = model.prompt_tower(tokens).features
        model.ctx.copy_(embedding.weight[x_id].expand(4, -1))
        plain = model.prompt_tower(tokens).features
    assert not torch.equal(before, plain)
    assert torch.equal(plain, model.backbone.encode_text(tokens))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers-data")
    return {"manifest": make_manifest(root / "data", n_train=8, n_val=4),
            "folder": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("kind,method,task", [
    ("clip", "nearl", "retrieval"), ("clip", "nearl", "classification"), ("clip", "alta", "retrieval"),
    ("clip", "clip-adapter", "retrieval"), ("clip", "coop", "classification"),
    ("clip", "linear-probe", "classification"), ("clip", "zeroshot", "retrieval"),
    ("siglip", "nearl", "retrieval"), ("siglip", "nearl", "classification"), ("siglip", "alta", "retrieval"),
    ("siglip", "clip-adapter", "retrieval"), ("siglip", "coop", "classification"),
    ("siglip", "linear-probe", "classification"), ("siglip", "zeroshot", "retrieval")])
def test_methods_train_resume_and_restore(tmp_path, names, data, kind, method, task):
    src = data["manifest"] if task == "retrieval" else data["folder"]
    common = ["--method", method, "--task", task, "--model", names[kind], "--data", src, "--batch-size", 4,
              "--warmup", 1, "--eval-every", 0, "--out", tmp_path / "run", *FAST]
    summary = run(common + ["--max-steps", 2])
    assert summary["method"] == method
    if method == "nearl":  # and a resume continues it
        assert run(common + ["--max-steps", 3, "--resume", tmp_path / "run"])["step"] == 3
    assert all(np.isfinite(train_losses(tmp_path / "run")[0]))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["model_name"] == names[kind]
    restored = MT.build_from_checkpoint(ckpt)
    for k, v in restored.trainable_state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    report = E.main(["--checkpoint", str(tmp_path / "run"), "--data", str(src), "--split", "val", "--workers", "0",
                     "--no-progress"])
    assert report["task"] == task and all(np.isfinite(v) for v in report["metrics"].values())


# ----------------------------------------------------------------------------- loading
def test_weights_in_a_folder_load_and_a_folder_without_them_says_so(names, tmp_path):
    source = create_backbone(names["clip"]).hf  # random weights from the config alone
    folder = tmp_path / "weighted"
    tiny_transformers.write(folder, "clip")
    with pytest.raises(ValueError, match="has a config but no weights"):
        create_backbone("ViT-B-16", "transformers:" + str(folder))
    tiny_transformers.save_weights(source, folder)
    loaded = nearl.build("anything", pretrained="transformers:" + str(folder))
    assert loaded.model_name == "transformers:" + str(folder)
    for (k, v), (k2, v2) in zip(source.state_dict().items(), loaded.backbone.hf.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_other_model_types_and_mixed_sources_are_refused(names, tmp_path):
    from transformers import BertConfig
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="is a 'bert' model. NEARL-CLIP adapts transformers CLIPModel, SiglipModel, "):
        create_backbone("transformers:" + str(tmp_path))
    with pytest.raises(UserError, match="missing: no such folder"):
        create_backbone("transformers:" + str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no transformers config found"):
        create_backbone("transformers:" + str(tmp_path / "empty"))
    with pytest.raises(UserError, match="cannot weight"):
        create_backbone(names["clip"], "openai")


class _Recorder:
    """Stands in for transformers' Auto classes and the hub: records what it is asked for."""

    def __init__(self, monkeypatch, folder):
        import transformers
        self.calls = []
        real_config = transformers.AutoConfig.from_pretrained(folder)
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                            lambda source, **kw: self.calls.append(("config", source)) or real_config)
        model = transformers.AutoModel.from_config(real_config)
        monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                            lambda source, **kw: self.calls.append(("weights", source)) or model)
        import huggingface_hub
        from nearl.towers import downloads
        monkeypatch.setattr(downloads, "check_reachable", lambda *a: None)  # no DNS look-up in the tests
        monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                            lambda repo, filename, **kw: self.calls.append(("file", repo, filename))
                            or str(folder / filename))


def test_a_hub_repo_id_is_passed_on_as_it_is(names, monkeypatch):
    rec = _Recorder(monkeypatch, Path(names["clip"][len("transformers:"):]))
    backbone = create_backbone("ViT-B-16", "transformers:vinid/plip")
    assert rec.calls == [("config", "vinid/plip"), ("weights", "vinid/plip"),
                         ("file", "vinid/plip", "preprocessor_config.json")]
    assert backbone.source == "vinid/plip" and backbone.preprocess_cfg["mean"] == (0.5, 0.4, 0.3)
    rec.calls.clear()
    fresh = create_backbone("transformers:flaviagiammarino/pubmed-clip-vit-base-patch32")
    assert [c[0] for c in rec.calls] == ["config", "file"]  # the config only: random weights
    seen = {}
    import open_clip.tokenizer
    monkeypatch.setattr(open_clip.tokenizer, "HFTokenizer", lambda source, **kw: seen.update(source=source, **kw))
    fresh.make_tokenizer()
    assert seen == {"source": "flaviagiammarino/pubmed-clip-vit-base-patch32", "context_length": 24}


def test_preprocessing_follows_the_image_processor_or_the_family_default(names):
    from transformers import AutoConfig
    clip = AutoConfig.from_pretrained(names["clip"][len("transformers:"):])
    siglip = AutoConfig.from_pretrained(names["siglip"][len("transformers:"):])
    assert TB.preprocess_cfg(clip, {}) == {"size": 32, "mode": "RGB", "mean": TB._OPENAI_MEAN, "std": TB._OPENAI_STD,
                                           "interpolation": "bicubic", "resize_mode": "shortest"}
    assert TB.preprocess_cfg(siglip, {}) == {"size": 32, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                             "interpolation": "bilinear", "resize_mode": "squash"}
    medsiglip = {"do_resize": True, "size": {"height": 448, "width": 448}, "resample": 2,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # as MedSigLIP's processor config says
    assert TB.preprocess_cfg(siglip, medsiglip)["resize_mode"] == "squash"
