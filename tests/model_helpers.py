"""Shared by the model tests: adapters moved off their init, a tiny batch, and the fused model checked
against the reference path (features, queries and every learnable gradient)."""
import torch

import nearl

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # without a GPU: the interpreter (conftest.py)


def perturb_adapters(model):
    """Adapters off their init (W_up != 0), so OCA really acts; draws from the global generator."""
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_is_the_frozen_backbone(model, images, tokens):
    """Both towers of `model` compute exactly what its frozen backbone computes."""
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        assert torch.equal(model.encode_text(tokens), model.backbone.encode_text(tokens))


def assert_padding_is_hidden(tower, tokens, pad_id):
    """The padding really is masked: other tokens at the padded positions, stepped under the
    tokens' own mask, change nothing the head pools, while the valid mask of those tokens differs."""
    other = tokens.clone()
    other[tokens == pad_id] = 7
    assert not torch.equal(tower.valid_mask(other), tower.valid_mask(tokens))
    with torch.no_grad():
        (x, mask), (x2, _) = tower.stem(tokens), tower.stem(other)
        assert not torch.equal(x, x2)
        for k in range(tower.depth):
            x, x2 = tower.block(k, x, mask), tower.block(k, x2, mask)
        assert torch.equal(tower.head(x2, tokens), tower.head(x, tokens))


def adapted_first_block(tower, tokens, attention):
    """Block 0 of `tower` on `tokens`, as (its input x, the output of its `attention` module, the block
    with ALTA's additions after_attention = h + 1 and beside_mlp = 0.5 h), once identity additions
    are checked to give the plain block exactly."""
    with torch.no_grad():
        x, mask = tower.stem(tokens)
        seen = {}
        hook = attention.register_forward_hook(lambda m, a, out: seen.update(a=out[0]))
        plain = tower.block(0, x, mask)
        hook.remove()
        assert torch.equal(tower.adapted_block(0, x, mask, lambda h: h, lambda h: 0 * h), plain)
        got = tower.adapted_block(0, x, mask, lambda h: h + 1.0, lambda h: 0.5 * h)
    return x, seen["a"], got


def trained_like(orth="hard"):
    """A tiny model whose adapters are no longer at init (W_up != 0), so OCA really acts."""
    torch.manual_seed(0)
    return perturb_adapters(nearl.build("NEARL-Tiny", orth=orth)).to(DEV)


def batch(model):
    g = torch.Generator().manual_seed(1)
    tokens = model.tokenizer()(["chest x-ray", "axial ct of the abdomen with contrast"])
    return torch.randn(2, 3, 32, 32, generator=g).to(DEV), tokens.to(DEV)


def features_and_grads(model, images, tokens, fused, autocast=None):
    model.fused = fused
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=autocast, enabled=autocast is not None):
        out = model(images, tokens)
        loss = nearl.NEARLLoss.from_config(model.config)(out)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_fused_matches_reference(model, images, tokens, floor: float = 0.0):
    """Features, queries and every learnable gradient: fused (interpreter) against reference. `floor`:
    a gradient's error may also reach that fraction of the largest gradient's norm (float32 noise of
    a gradient whose terms nearly cancel is the size of the terms', not of what is left)."""
    ref_out, ref_grads = features_and_grads(model, images, tokens, fused=False)
    out, grads = features_and_grads(model, images, tokens, fused=True)
    for name in ("image_features", "text_features", "image_queries", "text_queries"):
        torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads)
    largest = max(g.norm() for g in ref_grads.values())
    for n, g in grads.items():
        scale = ref_grads[n].norm()
        assert (g - ref_grads[n]).norm() <= 1e-3 * scale + 1e-7 + floor * largest, n


def assert_every_parameter_learns_and_backbone_stays(model, images, tokens):
    """Two AdamW steps of the NEARL loss: every learnable parameter gets a finite, nonzero gradient (W_up
    starts at 0, so the second step reaches what is behind it), no frozen one gets any, and the backbone's
    state (BatchNorm statistics included) is unchanged."""
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    loss_fn = nearl.NEARLLoss.from_config(model.config)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    touched = {n: False for n, p in model.named_parameters() if p.requires_grad}
    assert touched and not any(n.startswith("backbone.") for n in touched)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(images, tokens))["loss"].backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is None or torch.isfinite(p.grad).all(), n
                touched[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
            else:
                assert p.grad is None, n
        opt.step()
    assert [n for n, ok in touched.items() if not ok] == []
    after = model.backbone.state_dict()
    # NaN equals NaN here: open_clip leaves some unused random-init tensors as torch.empty's memory
    # (CoCa's text_decoder.text_projection), NaN on some draws, and that is no change
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=k)
