"""BiomedCLIP's architecture (tests/tiny_biomed.py): the timm image tower and the Hugging Face BERT
text tower (nearl/towers/hf_text.py), offline, on every supported path."""
import numpy as np
import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.towers import HFText, TimmVision
from model_helpers import (adapted_first_block, assert_fused_matches_reference, assert_is_the_frozen_backbone,
                              assert_padding_is_hidden, perturb_adapters)
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
import tiny_biomed
import tiny_roberta

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAPTIONS = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"]


@pytest.fixture(scope="module")
def name(tmp_path_factory):
    return tiny_biomed.register(tmp_path_factory.mktemp("biomed"))


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(CAPTIONS[:n])


def test_a_fresh_model_is_the_frozen_biomedclip_bit_for_bit(name):
    model = nearl.build(name)
    assert isinstance(model.tower("vision"), TimmVision) and isinstance(model.tower("text"), HFText)
    images, tokens = batch(model)
    assert tokens.shape == (3, 32) and (tokens == 0).any()  # padded: the mask matters
    assert_is_the_frozen_backbone(model, images, tokens)
    tokens_out = model(images.requires_grad_(), tokens).text_features
    assert torch.equal(tokens_out, model.backbone.encode_text(tokens))


def test_the_text_tower_steps_as_bert_with_its_padding_mask(name):
    model = nearl.build(name)
    tower = model.tower("text")
    _, tokens = batch(model)
    assert torch.equal(tower.valid_mask(tokens), tokens != 0) and tower.width == 48 and tower.depth == 2
    with torch.no_grad():
        x, mask = tower.stem(tokens)
        for k in range(tower.depth):
            x = tower.block(k, x, mask)
        assert torch.equal(tower.head(x, tokens), model.backbone.encode_text(tokens))
    assert_padding_is_hidden(tower, tokens, pad_id=0)
    assert tower.output_dim() == 32


def test_fused_and_reference_agree_on_both_towers(name):
    torch.manual_seed(0)
    model = nearl.build(name).to(DEV)
    perturb_adapters(model)
    assert_fused_matches_reference(model, *(t.to(DEV) for t in batch(model, n=2)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("biomed-data")
    return {"manifest": make_manifest(root / "data", n_train=8, n_val=4),
            "folder": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("method,task", [("nearl", "retrieval"), ("nearl", "classification"), ("alta", "retrieval"),
                                         ("clip-adapter", "retrieval"), ("coop", "classification"),
                                         ("linear-probe", "classification"), ("zeroshot", "retrieval")])
def test_methods_train_resume_and_restore_on_biomedclip(tmp_path, name, data, method, task):
    src = data["manifest"] if task == "retrieval" else data["folder"]
    common = ["--method", method, "--task", task, "--model", name, "--data", src, "--batch-size", 4,
              "--warmup", 1, "--eval-every", 0, "--out", tmp_path / "run", *FAST]
    summary = run(common + ["--max-steps", 2])
    assert summary["method"] == method
    if method == "nearl":  # and a resume continues it
        assert run(common + ["--max-steps", 3, "--resume", tmp_path / "run"])["step"] == 3
    assert all(np.isfinite(train_losses(tmp_path / "run")[0]))
    ckpt = load_checkpoint(tmp_path / "run")
    restored = MT.build_from_checkpoint(ckpt)
    for k, v in restored.trainable_state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k


def test_alta_adapters_in_bert_post_norm_layers(name):
    """x1 = LN1(x + attn(x)) + A1(.), then LN2(x1 + mlp(x1) + s A2(x1)): the hooks put each term
    there, and with zero adapters (a fresh ALTA) the model is the frozen one bit for bit."""
    fresh = MT.build_method("alta", name)
    images, tokens = batch(fresh)
    assert_is_the_frozen_backbone(fresh, images, tokens)
    tower = fresh.tower("text")
    layer = tower.blocks[0]
    _, attended, got = adapted_first_block(tower, tokens, layer.attention)  # attention's output: LN1(x + attn(x))
    with torch.no_grad():
        x1 = attended + 1.0
        want = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x1)) + 0.5 * x1 + x1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_coop_context_goes_after_cls_in_place_of_the_word_embeddings(name):
    """BERT normalises its embeddings: the learned context replaces the placeholders' word
    embeddings before that, so with the placeholder's own embedding the prompt is the plain text."""
    model = MT.build_method("coop", name, n_ctx=4)
    tokens = model.class_prompt_tokens(["effusion", "normal"])
    x_id = model.tokenizer().tokenizer.convert_tokens_to_ids("x")
    assert tokens[0, 0] == 2 and (tokens[:, 1:5] == x_id).all()  # [CLS], then the context
    with torch.no_grad():
        before = model.prompt_tower(tokens).features
        model.ctx.copy_(model.backbone.text.transformer.embeddings.word_embeddings.weight[x_id].expand(4, -1))
        plain = model.prompt_tower(tokens).features
    assert not torch.equal(before, plain)
    assert torch.equal(plain, model.backbone.encode_text(tokens))


def test_biomedclip_at_full_size_its_parameters_and_a_frozen_text_pass(tmp_path, capsys):
    """The BiomedCLIP row (README, "Backbones"; docs/backbones.md): NEARL-CLIP's learnable
    parameters on BiomedCLIP's real architecture, and a padded 256-token caption through the
    stepped PubMedBERT, bit for bit."""
    model = nearl.build(tiny_biomed.register_full(tmp_path))
    model.print_parameter_breakdown()
    table = capsys.readouterr().out
    assert "Total learnable                                  1,690,776" in table, table
    assert "Frozen backbone                                195,902,721" in table, table
    assert (model.tower("vision").width, model.tower("text").width, model.tower("text").depth) == (768, 768, 12)
    tokens = torch.randint(1000, 2000, (1, 256), generator=torch.Generator().manual_seed(0))
    tokens[0, 0], tokens[0, 39], tokens[0, 40:] = 2, 3, 0  # [CLS] ... [SEP] then padding
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.backbone.encode_text(tokens))


# ----------------------------------------------------------------------------- RoBERTa
@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return tiny_roberta.register(tmp_path_factory.mktemp("roberta"))


def test_roberta_steps_bit_for_bit_with_its_padding_id_and_mean_pooling(roberta):
    """RoBERTa pads with id 1 and counts positions from there: the stepped tower is its forward."""
    model = nearl.build(roberta)
    tower = model.tower("text")
    assert isinstance(tower, HFText) and tower.pad_id == tiny_roberta.PAD
    images, tokens = batch(model)
    assert tokens[0, 0] == 0 and (tokens == tiny_roberta.PAD).any()
    assert torch.equal(tower.valid_mask(tokens), tokens != tiny_roberta.PAD)
    assert_is_the_frozen_backbone(model, images, tokens)
    assert_padding_is_hidden(tower, tokens, pad_id=tiny_roberta.PAD)  # masked, and left out of the mean


def test_roberta_fused_and_reference_agree_and_alta_starts_as_the_frozen_model(roberta):
    torch.manual_seed(0)
    model = perturb_adapters(nearl.build(roberta)).to(DEV)
    assert_fused_matches_reference(model, *(t.to(DEV) for t in batch(model, n=2)))
    alta = MT.build_method("alta", roberta)
    images, tokens = batch(alta)
    with torch.no_grad():
        assert torch.equal(alta.encode_text(tokens), alta.backbone.encode_text(tokens))
