"""NEARLCLIP around a frozen open_clip backbone: exactness at init, parameters, gradients, loading."""
import json

import open_clip
import pytest
import torch

import nearl
from nearl.model.nearl_clip import create_backbone

TINY = "NEARL-Tiny"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return nearl.build(TINY)


def batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    captions = ["a chest x-ray with a small left effusion", "axial ct of the abdomen", "fundus photograph"][:n]
    return images, model.tokenizer()(captions)


def test_fresh_model_computes_exactly_the_frozen_clip(tiny):
    images, tokens = batch(tiny)
    with torch.no_grad():
        assert torch.equal(tiny.encode_image(images), tiny.backbone.encode_image(images))
        assert torch.equal(tiny.encode_text(tokens), tiny.backbone.encode_text(tokens))
    # With autograd on (adapters require grad, so attention takes its non-fast path on both sides).
    images.requires_grad_()
    assert torch.equal(tiny.encode_image(images), tiny.backbone.encode_image(images))
    assert torch.equal(tiny(images, tokens).text_features, tiny.backbone.encode_text(tokens))


def test_with_gradients_on_a_fresh_model_is_its_frozen_clip_within_float32_noise(tiny):
    """Training puts the adapters in the graph, so the tokens require grad and open_clip's attention
    leaves its no-grad fast path: against the frozen CLIP as inference runs it, the features then differ
    in the last bits (measured 1.9e-7 of their largest value here, 5.3e-7 at ViT-B-16 and 7.4e-7 at
    ViT-B-32 with random weights; the text towers exactly equal). docs/model.md states this bound."""
    images, tokens = batch(tiny)
    with torch.no_grad():
        frozen_i, frozen_t = tiny.backbone.encode_image(images), tiny.backbone.encode_text(tokens)
    out = tiny(images, tokens)
    assert out.image_features.requires_grad
    for got, want in ((out.image_features, frozen_i), (out.text_features, frozen_t)):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize("orth", ["soft", "none"])
def test_every_orth_mode_starts_as_the_frozen_clip(orth):
    model = nearl.build(TINY, orth=orth)
    images, tokens = batch(model)
    with torch.no_grad():
        out = model(images, tokens)
        assert torch.equal(out.image_features, model.backbone.encode_image(images))
        assert torch.equal(out.text_features, model.backbone.encode_text(tokens))
    assert (out.orth_penalty is not None) == (orth == "soft")


def test_forward_returns_features_and_final_queries(tiny):
    images, tokens = batch(tiny)
    out = tiny(images, tokens)
    assert out.image_features.shape == out.text_features.shape == (3, 32)
    assert out.image_queries.shape == out.text_queries.shape == (3, 16, 128)
    # The queries were updated by reading the tokens: they differ per sample.
    assert not torch.allclose(out.image_queries[0], out.image_queries[1])
    assert out.logit_scale.requires_grad is False


def test_text_valid_mask_ends_at_end_of_text(tiny):
    tokens = tiny.tokenizer()(["ct", "a much longer caption about a chest radiograph"])
    valid = tiny.tower("text").valid_mask(tokens)
    eot = tokens.argmax(-1)
    assert valid.sum(1).tolist() == (eot + 1).tolist()
    assert valid[0, : eot[0] + 1].all() and not valid[0, eot[0] + 1:].any()


def test_padding_after_end_of_text_never_reaches_the_text_queries(tiny):
    # Train the adapters a little so OCA is active, then change tokens after the end of text.
    model = nearl.build(TINY)
    for p in model.adapters.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    tokens = model.tokenizer()(["axial ct of the abdomen"])
    eot = tokens.argmax(-1).item()
    other = tokens.clone()
    other[0, eot + 1:] = 1234
    with torch.no_grad():
        a, b = model.text_tower(tokens), model.text_tower(other)
    assert torch.equal(a.queries, b.queries)
    assert torch.equal(a.features, b.features)


def test_vit_b16_learnable_parameters_within_3_percent_of_paper(capsys):
    model = nearl.build("ViT-B-16")
    n = model.num_trainable_parameters()
    assert abs(n - 1.46e6) / 1.46e6 < 0.03, n
    rows = model.parameter_breakdown()
    assert rows["OCA total"] + rows["USEformer total"] == n == rows["Total learnable"]
    assert round(rows["OCA total"] / 1e6, 2) == 1.00 and round(rows["USEformer total"] / 1e6, 2) == 0.43
    model.print_parameter_breakdown()
    printed = capsys.readouterr().out
    assert "OCA (vision)" in printed and "1,428,632" in printed


def test_every_parameter_gets_a_gradient_in_two_steps_and_the_backbone_stays_bit_identical():
    torch.manual_seed(0)
    model = nearl.build(TINY, orth="soft").train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss_fn = nearl.NEARLLoss.from_config(model.config)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    touched = {n: False for n, p in model.named_parameters() if p.requires_grad}
    assert touched and not any(n.startswith("backbone.") for n in touched)
    images, tokens = batch(model)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(images, tokens))["loss"].backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                touched[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
            else:
                assert p.grad is None, n
        opt.step()
    assert [n for n, ok in touched.items() if not ok] == []
    assert not model.backbone.training
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapted_layers_are_configurable():
    model = nearl.build(TINY, vision_layers=[2], text_layers=[])
    assert list(model.adapters) == ["vision"] and list(model.adapters["vision"].layers) == ["2"]
    with pytest.raises(ValueError, match=r"vision_layers must hold block indices in 1..2"):
        nearl.build(TINY, vision_layers=[0])
    with pytest.raises(ValueError, match="heads=3 must divide query_dim=128"):
        nearl.build(TINY, heads=3)


def test_trainable_state_dict_holds_only_the_adapters(tiny):
    state = tiny.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    assert sum(v.numel() for v in state.values()) == tiny.num_trainable_parameters()
    other = nearl.build(TINY)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="adapter state does not match"):
        other.load_trainable_state_dict({"queries.q0": state["queries.q0"]})


def test_non_native_towers_raise_a_clear_error():
    """The tower factory says what it found and which tower types it steps."""
    backbone = open_clip.create_model(TINY)
    backbone.visual = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="image tower of type Linear.*types block by block: open_clip VisionTransformer"):
        nearl.NEARLCLIP(backbone)
    backbone = open_clip.create_model(TINY)
    del backbone.token_embedding
    with pytest.raises(ValueError, match="without an open_clip text transformer.*: open_clip text transformer"):
        nearl.NEARLCLIP(backbone)


def test_pretrained_checkpoint_file_and_local_dir_load_weights(tmp_path):
    source = open_clip.create_model(TINY)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    from_file = nearl.build(TINY, pretrained=str(tmp_path / "weights.pt"))
    assert torch.equal(from_file.backbone.visual.proj, source.visual.proj)

    folder = tmp_path / "local"
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config(TINY), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(source.state_dict(), folder / "open_clip_pytorch_model.bin")
    from_dir = nearl.build(TINY, pretrained=f"local-dir:{folder}")
    assert torch.equal(from_dir.backbone.text_projection, source.text_projection)
    assert from_dir.model_name == f"local-dir:{folder}"


def test_hf_hub_source_is_passed_to_open_clip_as_the_model_name(monkeypatch):
    from nearl.towers import downloads
    seen = {}
    monkeypatch.setattr(downloads, "check_reachable", lambda *a: None)  # no DNS look-up in the tests
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: seen.update(name=name, **kw) or "m")
    assert create_backbone("ViT-B-16", "hf-hub:org/repo") == "m" and seen == {"name": "hf-hub:org/repo"}
    create_backbone("ViT-B-16", "openai")
    assert seen == {"name": "ViT-B-16", "pretrained": "openai"}
    seen.clear()
    create_backbone("ViT-B-16", None)  # random weights offline: no Hugging Face text weights fetched either
    assert seen == {"name": "ViT-B-16", "pretrained": None, "pretrained_hf": False}


def test_fused_model_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = nearl.build(TINY, fused=True)
    images, _ = batch(model)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        model.encode_image(images)


def test_the_tower_seam_steps_what_open_clip_encodes(tiny):
    """Stem, blocks and head through nearl.towers give open_clip's own features, both towers;
    and ALTA's split of a block at its branches recomposes the block."""
    from nearl.towers import towers_of
    g = torch.Generator().manual_seed(0)
    towers = towers_of(tiny.backbone)
    images = torch.randn(2, 3, *towers["vision"].image_size, generator=g)
    tokens = tiny.tokenizer()(["a chest radiograph", "ct"])
    with torch.no_grad():
        for kind, inputs, want in (("vision", images, tiny.backbone.encode_image(images)),
                                   ("text", tokens, tiny.backbone.encode_text(tokens))):
            tower = towers[kind]
            x, attn_mask = tower.stem(inputs)
            for k in range(tower.depth):
                parts = tower.prenorm_parts(k)
                y = x + parts.attention(x, attn_mask)
                split = y + parts.mlp(parts.norm2(y))
                x = tower.block(k, x, attn_mask)
                torch.testing.assert_close(split, x, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tower.head(x, inputs), want, rtol=1e-5, atol=1e-6)
    assert towers["vision"].output_dim() == want.shape[-1]


def test_one_tower_adapts_alone_beside_a_tower_no_seam_steps(monkeypatch):
    """towers=["vision"]: the text tower runs as the backbone runs it, so it may be one nearl.towers
    cannot step (here every text tower type is withdrawn); no queries there, so no alignment term."""
    import nearl.towers

    monkeypatch.setitem(nearl.towers.TOWER_TYPES, "text", ())
    with pytest.raises(ValueError, match="no supported text tower"):
        nearl.build(TINY)  # both towers adapted: the text tower must be stepped
    torch.manual_seed(0)
    model = nearl.build(TINY, towers=["vision"])
    assert set(model.adapters) == {"vision"} and set(model.queries.embed) == {"vision"}
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, tokens = batch(model)
    out = model(images, tokens)
    with torch.no_grad():
        assert torch.equal(out.text_features, model.backbone.encode_text(tokens))  # frozen, as the backbone runs it
        assert not torch.equal(out.image_features, model.backbone.encode_image(images))  # adapted
    assert out.text_queries is None and out.image_queries.shape[1:] == (model.config.num_queries, model.config.query_dim)
    terms = nearl.NEARLLoss.from_config(model.config)(out)
    assert "query_alignment" not in terms
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_the_text_tower_adapts_alone():
    torch.manual_seed(0)
    model = nearl.build(TINY, towers=["text"])
    images, tokens = batch(model)
    out = model(images, tokens)
    with torch.no_grad():
        assert torch.equal(out.image_features, model.backbone.encode_image(images))
    assert out.image_queries is None and out.text_queries is not None
