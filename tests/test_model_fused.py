"""A tiny NEARL-CLIP end to end: the fused layers (interpreter) against the reference layers."""
import math

import pytest
import torch

import nearl
import nearl.model

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


def assert_fused_matches_reference(model, images, tokens):
    """Features, queries and every learnable gradient: fused (interpreter) against reference."""
    ref_out, ref_grads = features_and_grads(model, images, tokens, fused=False)
    out, grads = features_and_grads(model, images, tokens, fused=True)
    for name in ("image_features", "text_features", "image_queries", "text_queries"):
        torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        scale = ref_grads[n].norm()
        assert (g - ref_grads[n]).norm() <= 1e-3 * scale + 1e-7, n


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_fused_model_matches_reference_features_and_gradients(orth):
    model = trained_like(orth)
    assert_fused_matches_reference(model, *batch(model))


def test_fused_model_under_bf16_autocast_is_as_accurate_as_the_reference():
    """Against the float32 model as the truth, the fused path under bf16 autocast errs no more
    than twice as much as the reference path under the same autocast."""
    model = trained_like()
    images, tokens = batch(model)
    truth_out, truth_grads = features_and_grads(model, images, tokens, fused=False)
    ref_out, ref_grads = features_and_grads(model, images, tokens, fused=False, autocast=torch.bfloat16)
    out, grads = features_and_grads(model, images, tokens, fused=True, autocast=torch.bfloat16)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for name in ("image_features", "text_features", "image_queries", "text_queries"):
        truth = getattr(truth_out, name)
        assert rel(getattr(out, name), truth) <= 2 * rel(getattr(ref_out, name), truth) + 1e-3, name
    gates = gate_sensitivity(model, images, tokens, ref_grads, rel)
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        bar = 2 * rel(ref_grads[n], truth_grads[n]) + 1e-3
        assert rel(g, truth_grads[n]) <= max(bar, gates.get(n, 0.0)), (n, rel(g, truth_grads[n]), bar, gates.get(n))


def gate_sensitivity(model, images, tokens, ref_grads, rel, draws=3):
    """SPEC 7: a gate's gradient (a sum over every token with heavy cancellation) is judged against
    its sensitivity to one-ulp changes of its inputs: the median relative change of the reference
    path's gate gradients under bf16 autocast when every adapted layer's x moves by one bf16 ulp
    (random signs). Measured here: 2-24% at NEARL-Tiny."""
    layer = nearl.model.ops.nearl_layer
    changes = {n: [] for n in ref_grads if n.endswith(".gate")}
    for seed in range(draws):
        g = torch.Generator().manual_seed(seed)

        def moved(x, *args, **kwargs):
            low = x.detach().to(torch.bfloat16)
            up = torch.randint(0, 2, x.shape, generator=g).bool().to(x.device)
            step = torch.where(up, torch.nextafter(low, torch.full_like(low, math.inf)),
                               torch.nextafter(low, torch.full_like(low, -math.inf))).float() - low.float()
            return layer(x + step.to(x.dtype), *args, **kwargs)
        nearl.model.ops.nearl_layer = moved
        try:
            _, grads = features_and_grads(model, images, tokens, fused=False, autocast=torch.bfloat16)
        finally:
            nearl.model.ops.nearl_layer = layer
        for n in changes:
            changes[n].append(rel(grads[n], ref_grads[n]))
    return {n: sorted(c)[len(c) // 2] for n, c in changes.items()}


def test_fresh_fused_model_is_still_the_frozen_clip():
    model = nearl.build("NEARL-Tiny", fused=True).to(DEV)
    images, tokens = batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.backbone.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tokens), model.backbone.encode_text(tokens), rtol=0, atol=1e-6)


def short_bf16_run(fused: bool, seed: int, steps: int) -> float:
    """The loss after `steps` AdamW steps under bf16 autocast on 4 fixed image-text pairs, from the
    adapters and queries that `seed` draws (the backbone is the same for every seed)."""
    torch.manual_seed(0)
    model = nearl.build("NEARL-Tiny").to(DEV)
    torch.manual_seed(seed)
    perturb_adapters(model)
    model.fused = fused
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=g).to(DEV)
    tokens = model.tokenizer()([f"finding: {w}" for w in ("effusion", "nodule", "cardiomegaly", "normal")]).to(DEV)
    loss_fn = nearl.NEARLLoss.from_config(model.config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = loss_fn(model(images, tokens))["loss"]
        loss.backward()
        opt.step()
    return loss.item()


def test_a_short_bf16_training_run_ends_within_seed_noise_of_the_reference():
    """SPEC 7: steps under bf16 autocast, fused against the reference path from the same start,
    end closer together than two reference runs from different seeds do. 50 steps on a GPU; 8 on
    the CPU, where the interpreter takes seconds a fused step."""
    steps = 50 if DEV == "cuda" else 8
    fused, reference, other_seed = (short_bf16_run(f, seed, steps) for f, seed in ((True, 0), (False, 0), (False, 1)))
    noise = abs(reference - other_seed)
    assert noise > 0.01 * abs(reference), (reference, other_seed)  # the seeds do differ
    assert abs(fused - reference) <= noise, (fused, reference, other_seed)
