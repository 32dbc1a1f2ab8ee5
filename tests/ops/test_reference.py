"""nearl.ops.reference against an independent float64 einsum statement of SPEC 3.1 (forward and gradients)."""
import pytest
import torch

from einsum_math import layer64, oca64
from factories import layer_inputs, oca_inputs, padding_mask
from nearl import ops
from nearl.ops import reference


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def grads(out_terms, inputs):
    torch.manual_seed(1)
    upstream = sum((t * torch.randn_like(t)).sum() for t in out_terms)
    return torch.autograd.grad(upstream, inputs, allow_unused=False)


@pytest.mark.parametrize("orth", ["hard", "soft", "none"])
@pytest.mark.parametrize("B,N,d,M", [(2, 1, 80, 1), (2, 77, 80, 33), (1, 197, 80, 5), (3, 7, 16, 16)])
def test_oca_matches_einsum_forward_and_grads(B, N, d, M, orth):
    inputs = [t.double().requires_grad_() for t in oca_inputs(B, N, d, M)]
    got = reference.oca(*inputs, orth=orth)
    want = oca64(*inputs, orth=orth)
    got, want = (list(v) if orth == "soft" else [v] for v in (got, want))
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float64
        assert rel_err(g_, w_) < 1e-12
    for g_, w_ in zip(grads(got, inputs), grads(want, inputs)):
        assert rel_err(g_, w_) < 1e-10


@pytest.mark.parametrize("orth", ["hard", "soft", "none"])
@pytest.mark.parametrize("B,N,d,M,masked", [(2, 1, 80, 1, False), (3, 77, 80, 33, True), (2, 197, 80, 5, True),
                                            (2, 9, 48, 16, False)])
def test_layer_matches_einsum_forward_and_grads(B, N, d, M, masked, orth):
    x, q, params = layer_inputs(B, N, d, M, D=32, r=8)
    mask = padding_mask(B, N) if masked else None
    x, q = x.double().requires_grad_(), q.double().requires_grad_()
    tensors = {k: v.double().requires_grad_() for k, v in params.items() if torch.is_tensor(v)}
    p = dict(tensors, heads=4)
    got = reference.nearl_layer(x, q, p, mask=mask, orth=orth)
    want = layer64(x, q, p, mask=mask, orth=orth)
    for g_, w_ in zip(got, want):
        assert rel_err(g_, w_) < 1e-12
    inputs = [x, q, *tensors.values()]
    for name, g_, w_ in zip(["x", "q", *tensors], grads(got, inputs), grads(want, inputs)):
        assert rel_err(g_, w_) < 1e-10, name


def test_gradcheck_oca_every_mode():
    for orth in ("hard", "soft", "none"):
        inputs = [t.double().requires_grad_() for t in oca_inputs(2, 3, 8, 3)]
        assert torch.autograd.gradcheck(lambda *t: reference.oca(*t, orth=orth), inputs)


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_gradcheck_layer_with_mask(orth):
    x, q, params = layer_inputs(2, 4, 8, 2, D=8, r=4, heads=2)
    names = [k for k, v in params.items() if torch.is_tensor(v)]
    mask = torch.tensor([[True, False, False, False], [True, True, True, False]])

    def fn(x, q, *tensors):
        return reference.nearl_layer(x, q, dict(zip(names, tensors)), mask=mask, orth=orth, heads=2)

    inputs = [t.double().requires_grad_() for t in (x, q, *(params[k] for k in names))]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_update_is_orthogonal_to_each_token(dtype):
    x, a, c, gate = oca_inputs(2, 77, 80, 16)
    out = reference.oca_math(x, a, c, gate, "hard")[0]
    update = out - x
    cos = (update * x).sum(-1) / (update.norm(dim=-1) * x.norm(dim=-1))
    assert update.norm(dim=-1).min() > 1e-3  # a real update, not a trivially orthogonal zero
    assert cos.abs().max() < 1e-5
    # The public op in a half dtype still projects in float32 before rounding.
    got = ops.oca(x.to(dtype), a, c, gate, impl="reference")
    assert got.dtype == dtype


def test_masked_positions_change_nothing_in_q_out():
    x, q, params = layer_inputs(3, 20, 48, 5)
    mask = padding_mask(3, 20)
    x_out, q_out = ops.nearl_layer(x, q, params, mask=mask, impl="reference")
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 10)  # scramble every masked token
    x2_out, q2_out = ops.nearl_layer(x2, q, params, mask=mask, impl="reference")
    assert torch.equal(q_out, q2_out)
    assert not torch.equal(x_out, x2_out)  # the masked tokens still got their own OCA update
    assert torch.equal(x_out[mask], x2_out[mask])


def test_full_mask_equals_no_mask():
    x, q, params = layer_inputs(2, 13, 32, 4, batched_q=False)
    full = torch.ones(2, 13, dtype=torch.bool)
    a = ops.nearl_layer(x, q, params, mask=full, impl="reference")
    b = ops.nearl_layer(x, q, params, mask=None, impl="reference")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_outputs_keep_input_dtypes_and_compute_in_fp32(dtype):
    x, q, params = layer_inputs(2, 9, 32, 3)
    x_out, q_out, cos2 = ops.nearl_layer(x.to(dtype), q, params, orth="soft", impl="reference")
    assert x_out.dtype == dtype and q_out.dtype == torch.float32 and cos2.dtype == torch.float32
    want = layer64(x.to(dtype), q, params, orth="soft")
    # Only x's rounding to `dtype` separates the two: the math itself ran in float32.
    assert rel_err(q_out, want[1]) < 1e-5
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(x_out, want[0]) < tol


def test_reference_ignores_autocast():
    x, q, params = layer_inputs(2, 9, 32, 3)
    plain = ops.nearl_layer(x, q, params, impl="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ops.nearl_layer(x, q, params, impl="reference")
    for u, v in zip(plain, under):
        assert u.dtype == v.dtype and torch.equal(u, v)


def test_zero_up_projection_is_identity_on_tokens():
    x, q, params = layer_inputs(2, 9, 32, 3)
    params["w_up"] = torch.zeros_like(params["w_up"])
    for orth in ("hard", "soft", "none"):
        assert torch.equal(ops.nearl_layer(x, q, params, orth=orth, impl="reference")[0], x)
