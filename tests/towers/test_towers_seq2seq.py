"""open_clip's `mt5-*` and `nllb-clip-*` configurations: HFTextEncoder around an MT5 encoder stack
(T5's relative position bias, computed by the first layer and handed on) or an M2M100 encoder (scaled
embeddings, sinusoidal positions), nearl/towers/hf_seq2seq_text.py. Each on a shrunk copy of its
config (tests/tiny_families.py) with a tiny local MT5 / M2M100 and a tokenizer that frames text as
theirs do (tests/tiny_hf_text.py), random weights, offline."""
import numpy as np
import pytest
import torch

import nearl
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.towers import HFM2M100Text, HFT5Text
from model_helpers import (assert_fused_matches_reference, assert_is_the_frozen_backbone, assert_padding_is_hidden,
                           perturb_adapters)
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses
from tiny_families import register
import tiny_hf_text

TOWERS = {"mt5-base-ViT-B-32": (HFT5Text, "mt5"), "nllb-clip-base": (HFM2M100Text, "m2m_100")}
CAPTIONS = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"]


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seq2seq")
    return {name: register(folder, name) for name in TOWERS}


def build(names, name, **config):
    torch.manual_seed(0)
    return nearl.build(names[name], **config)


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), model.tokenizer()(CAPTIONS[:n])


@pytest.mark.parametrize("name", list(TOWERS))
def test_a_fresh_model_is_the_frozen_backbone_bit_for_bit(names, name):
    model = build(names, name)
    cls, arch = TOWERS[name]
    tower = model.tower("text")
    assert type(tower) is cls and tower.depth == 2 and tower.width == 32
    images, tokens = batch(model)
    pad = tiny_hf_text.pad_id(arch)
    assert (tokens == pad).any() and torch.equal(tower.valid_mask(tokens), tokens != pad)
    if arch == "mt5":  # no start token, ends with </s> (id 1); no position table: open_clip's 77 tokens
        assert tokens.shape[1] == tower.context_length == 77 and tokens[0, 0] > 2
    else:  # the language code first
        assert tokens.shape[1] == tower.context_length == 16 and (tokens[:, 0] == 4).all()
    assert_is_the_frozen_backbone(model, images, tokens)
    out = model(images.requires_grad_(), tokens)  # autograd on as well
    assert torch.equal(out.text_features, model.backbone.encode_text(tokens))


@pytest.mark.parametrize("name", list(TOWERS))
def test_stepping_and_splitting_the_layers_reproduce_the_encoder(names, name):
    model = build(names, name)
    tower = model.tower("text")
    _, tokens = batch(model)
    with torch.no_grad():
        want = model.backbone.encode_text(tokens)
        x, extra = tower.stem(tokens)
        for k in range(tower.depth):
            parts = tower.prenorm_parts(k)
            y = x + parts.attention(x, extra)
            split = y + parts.mlp(parts.norm2(y))
            plain = tower.block(k, x, extra)
            assert torch.equal(tower.adapted_block(k, x, extra, lambda h: h, lambda h: 0 * h), plain)
            torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)
            x = plain
        assert torch.equal(tower.head(x, tokens), want)
    assert_padding_is_hidden(tower, tokens, pad_id=tower.pad_id)
    assert tower.output_dim() == 32


def test_t5s_position_bias_is_the_one_its_first_layer_hands_on(names):
    """The stem gives every layer the bias the stack gives its second layer: the first layer's."""
    model = build(names, "mt5-base-ViT-B-32")
    tower, text = model.tower("text"), model.backbone.text
    _, tokens = batch(model)
    seen = {}

    def capture(module, args, kwargs):
        seen["bias"] = args[2] if len(args) > 2 else kwargs["position_bias"]

    hook = tower.blocks[1].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        text(tokens)
        hook.remove()
        _, (args, kwargs) = tower.stem(tokens)
    bias = args[1] if len(args) > 1 else kwargs["position_bias"]
    assert seen["bias"] is not None and torch.equal(bias, seen["bias"])
    assert bias.shape[-2:] == (tokens.shape[1], tokens.shape[1])


@pytest.mark.parametrize("name", list(TOWERS))
def test_fused_and_reference_agree(names, name):
    model = perturb_adapters(build(names, name))
    images, tokens = batch(model, n=2)
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(tokens), model.backbone.encode_text(tokens))
    assert_fused_matches_reference(model, images, tokens)


@pytest.mark.parametrize("name", list(TOWERS))
def test_alta_fresh_is_the_frozen_backbone(names, name):
    torch.manual_seed(0)
    model = MT.build_method("alta", names[name], seed=0)
    assert_is_the_frozen_backbone(model, *batch(model))


@pytest.mark.parametrize("name", list(TOWERS))
def test_coop_context_goes_where_a_word_would(names, name):
    """MT5's tokenizer adds no start token: the context comes first; NLLB's after its language code,
    scaled as M2M100 scales its words. With the placeholders' own embeddings (`word_embeddings`) the
    prompt is the text."""
    torch.manual_seed(0)
    model = MT.build_method("coop", names[name], n_ctx=4)
    tower = model.tower("text")
    at = tower.context_at
    assert at == (0 if name.startswith("mt5") else 1)
    tokens = model.class_prompt_tokens(["effusion", "normal"])
    x_id = model.tokenizer().tokenizer.convert_tokens_to_ids("x")
    assert (tokens[:, at:at + 4] == x_id).all()
    with torch.no_grad():
        before = model.prompt_tower(tokens).features
        model.ctx.copy_(tower.word_embeddings(tokens)[0, at:at + 4])  # what BiomedCoOp starts from
        plain = model.prompt_tower(tokens).features
    assert not torch.equal(before, plain)
    assert torch.equal(plain, model.backbone.encode_text(tokens))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"retrieval": make_manifest(root / "data", n_train=8, n_val=4),
            "classification": make_image_folder(root / "folder", per_class=(4, 2))}


@pytest.mark.parametrize("method,task", [("nearl", "retrieval"), ("alta", "retrieval"), ("clip-adapter", "retrieval"),
                                         ("coop", "classification"), ("linear-probe", "classification"),
                                         ("zeroshot", "retrieval")])
@pytest.mark.parametrize("name", list(TOWERS))
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
