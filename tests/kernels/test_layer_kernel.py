"""The fused NEARL layer (impl="triton", CPU interpreter) against the float64 einsum statement:
forward and every gradient, odd sizes, masks, strided inputs, NaN-poisoned outputs, determinism."""
import pytest
import torch

import nearl_kernels.layer as fused
import nearl_kernels.runtime
import precision_bar
from factories import layer_inputs, padding_mask
from nearl import ops
from nearl.ops import fused_layer

# On a GPU the kernels run for real; without one conftest.py turned the interpreter on.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture(autouse=True)
def poison_outputs(poisoned_outputs):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the test."""


err = precision_bar.err  # norm-relative; where the reference is exactly zero, the largest absolute value


def run(impl, x, q, params, mask, orth, upstream):
    """Outputs and the gradients of every input for a fixed upstream gradient: impl "float64" (the
    einsum statement) or an `ops.nearl_layer` impl."""
    how = "float64" if impl == "float64" else (
        lambda x, q, p, mask, orth: ops.nearl_layer(x, q, p, mask=mask, orth=orth, impl=impl))
    return precision_bar.run_layer(how, x, q, params, mask, orth, upstream)


def upstream_for(B, N, d, M, D, orth, seed=7):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, N, d), (B, M, D)] + ([(B, N)] if orth == "soft" else [])
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]


CASES = [
    # B, N, d, M, D, masked, orth, dtype, batched q
    (2, 1, 80, 1, 32, False, "hard", torch.float32, True),
    (3, 77, 80, 33, 32, True, "soft", torch.float32, True),
    (2, 197, 48, 16, 128, True, "hard", torch.float32, False),
    (2, 77, 64, 5, 128, True, "none", torch.float32, True),
    (1, 197, 16, 16, 32, False, "soft", torch.float32, False),
    (2, 77, 80, 16, 32, True, "hard", torch.bfloat16, True),
    (2, 50, 48, 8, 32, False, "soft", torch.float16, True),
    (2, 256, 48, 16, 128, True, "hard", torch.bfloat16, True),  # BiomedCLIP's text: 256 tokens, padding mask
    (1, 40, 1152, 16, 128, True, "soft", torch.bfloat16, True),  # SigLIP so400m's width
]


@pytest.mark.parametrize("B,N,d,M,D,masked,orth,dtype,batched", CASES)
def test_forward_and_every_gradient_match_float64(B, N, d, M, D, masked, orth, dtype, batched):
    check_against_float64(B, N, d, M, D, masked, orth, dtype, batched)


H100_CASES = [
    # B, N, d, M, D, masked, orth, dtype, NEARL_SM_COUNT (None: the H100's 132)
    (2, 40, 64, 5, 32, True, "hard", torch.float32, None),  # a split per token tile (3 fwd, 3 bwd columns)
    (2, 40, 64, 16, 128, True, "soft", torch.bfloat16, "1"),  # one split of every tile per sample
    (3, 40, 64, 16, 128, False, "none", torch.float32, "2"),  # uneven splits (2 + 1 tiles) in the bwd columns
    (2, 40, 208, 16, 128, False, "hard", torch.bfloat16, "1"),  # bwd columns in a 128 and a masked 80-wide chunk
]


@pytest.mark.parametrize("B,N,d,M,D,masked,orth,dtype,sm_count", H100_CASES)
def test_h100_tiling_matches_float64(B, N, d, M, D, masked, orth, dtype, sm_count, monkeypatch):
    """NEARL_TILING=h100: the tiles and token splits an H100 runs, here on any device."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    if sm_count is None:
        monkeypatch.delenv("NEARL_SM_COUNT", raising=False)
    else:
        monkeypatch.setenv("NEARL_SM_COUNT", sm_count)
    fwd = fused.layer_config(B, N, d, M, 4 * M, D, dtype, torch.device(DEV))
    assert fwd.block_c == 16 and fwd.attn_block_n == 32, fwd  # the GPU's tiles, not the interpreter's
    bwd = fused.layer_bwd_config(B, N, d, M, 4 * M, dtype, torch.device(DEV))
    assert bwd.rows_block_n == bwd.cols_block_n == 16 and bwd.cols_block_d <= 128, bwd
    check_against_float64(B, N, d, M, D, masked, orth, dtype, True)


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_a100_tiling_matches_float64(orth, monkeypatch):
    """NEARL_TILING=a100: sm_80's own tiles (64 tokens x 16 columns forward, 32-column backward
    programs, here one full and one masked 16-wide), two token splits in the backward's columns
    kernel."""
    monkeypatch.setenv("NEARL_TILING", "a100")
    monkeypatch.setenv("NEARL_SM_COUNT", "2")
    B, N, d, M, D, dtype = 2, 40, 48, 16, 128, torch.bfloat16
    fwd = fused.layer_config(B, N, d, M, 4 * M, D, dtype, torch.device(DEV))
    bwd = fused.layer_bwd_config(B, N, d, M, 4 * M, dtype, torch.device(DEV), orth)
    assert (fwd.block_n, fwd.block_c, bwd.cols_block_d, bwd.splits) == (64, 16, 32, 2), (fwd, bwd)
    check_against_float64(B, N, d, M, D, True, orth, dtype, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_with_a_large_mean(dtype, monkeypatch):
    """Residual streams: row means 150 times their spread, under the H100's tiles (16-column
    chunks). The forward's statistics and every product come from shifted rows: no cancellation."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    check_against_float64(2, 40, 64, 5, 32, True, "hard", dtype, True, offset=300.0)
    check_against_float64(1, 33, 48, 16, 128, False, "soft", dtype, True, offset=-300.0)


@pytest.mark.parametrize("B,N,d,M,D,masked,orth", [
    (2, 197, 768, 16, 128, False, "hard"),  # ViT-B/16
    (2, 77, 512, 16, 128, True, "soft"),    # the text tower, key mask
])
def test_bf16_with_the_gpus_tf32(B, N, d, M, D, masked, orth, monkeypatch, gpu_tf32):
    """bfloat16 x takes TF32 products (kernels/policy.py), whose operands the GPU's tensor cores
    truncate at 2^-10, where the interpreter multiplies in float32 unless told (kernels/runtime.py).
    Told, at the real widths and the H100 tiling, the layer still meets SPEC 7's bar."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    check_against_float64(B, N, d, M, D, masked, orth, torch.bfloat16, True)


@pytest.mark.parametrize("B,N,d,M,D,masked,orth", [
    (2, 77, 512, 16, 128, True, "soft"),    # the text tower, key mask (ViT-B/16's tiles: the bf16 test's)
])
def test_float32_below_highest_precision_takes_tf32(B, N, d, M, D, masked, orth, monkeypatch, gpu_tf32):
    """float32 x follows torch.get_float32_matmul_precision() as torch.matmul does (SPEC 7): at
    "high", TF32 products (the tensor cores' truncation emulated) under the half-precision bar,
    the peer taking TF32 products too."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert fused.layer_config(B, N, d, M, 4 * M, D, torch.float32, torch.device("cpu")).precision == "tf32"
        check_against_float64(B, N, d, M, D, masked, orth, torch.float32, True)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert fused.layer_config(B, N, d, M, 4 * M, D, torch.float32, torch.device("cpu")).precision == "ieee"


def check_against_float64(B, N, d, M, D, masked, orth, dtype, batched, offset=0.0):
    """Forward and every gradient against float64: float32 x within 1e-4 at "highest" matmul
    precision; 16-bit x (and float32 below "highest") under SPEC 7's bar: twice the error of the
    same math at x's precision plus the rounding of the exact result, the gate's gradient (a sum
    with heavy cancellation) against its one-ulp sensitivity."""
    x, q, params = layer_inputs(B, N, d, M, D=D, r=8, dtype=dtype, batched_q=batched, device=DEV)
    x = (x.float() + offset).to(dtype)
    mask = padding_mask(B, N).to(DEV) if masked else None  # sample 0 has a single valid token
    up = upstream_for(B, N, d, M, D, orth)
    want = precision_bar.run_layer("float64", x, q, params, mask, orth, up)
    got = precision_bar.run_layer(triton_layer, x, q, params, mask, orth, up)
    assert got[0][0].dtype == dtype and got[0][1].dtype == torch.float32
    for k, g_ in got[1].items():
        assert g_.dtype == (dtype if k == "x" else torch.float32), k
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        bars = {name: (e, 1e-4) for name, (e, _) in precision_bar.bars(got, got, want).items()}
    else:
        peer = precision_bar.run_layer("peer", x, q, params, mask, orth, up)
        gate = precision_bar.ulp_sensitivity(x, q, params, mask, orth, up)
        bars = precision_bar.bars(got, peer, want, {"gate": gate})
    for name, (e, bar) in bars.items():
        assert e <= bar, (name, e, bar)


def test_strided_inputs():
    B, N, d, M, D = 2, 77, 48, 5, 32
    x, q, params = layer_inputs(B, N, d, M, D=D, r=8, device=DEV)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # d is the slow axis
    q_strided = torch.cat([q, q], dim=2)[..., ::2]  # every other column of a wider buffer
    q_strided.copy_(q)
    params = dict(params, w_k=params["w_k"].t().contiguous().t(), w_down=params["w_down"].t().contiguous().t())
    assert not x_strided.is_contiguous() and not q_strided.is_contiguous()
    up = upstream_for(B, N, d, M, D, "hard")
    want_out, want_grad = run("float64", x, q, params, None, "hard", up)
    got_out, got_grad = run("triton", x_strided, q_strided, params, None, "hard", up)
    for g_, w_ in zip(got_out, want_out):
        assert err(g_, w_) < 1e-4
    for k in want_grad:
        assert err(got_grad[k], want_grad[k]) < 1e-4, k


def test_two_backward_runs_are_bit_identical():
    x, q, params = layer_inputs(2, 197, 48, 16, D=32, r=8, device=DEV)
    mask = padding_mask(2, 197).to(DEV)
    up = upstream_for(2, 197, 48, 16, 32, "soft")
    _, first = run("triton", x, q, params, mask, "soft", up)
    _, second = run("triton", x, q, params, mask, "soft", up)
    for k in first:
        assert torch.equal(first[k], second[k]), k


def test_masked_tokens_get_their_oca_update_but_never_reach_q_out():
    x, q, params = layer_inputs(2, 40, 32, 4, D=32, r=8, device=DEV)
    mask = padding_mask(2, 40).to(DEV)
    x2 = torch.where(mask[..., None], x, x + 5 * torch.randn_like(x))
    a = ops.nearl_layer(x, q, params, mask=mask, impl="triton")
    b = ops.nearl_layer(x2, q, params, mask=mask, impl="triton")
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[0][~mask], b[0][~mask])


def test_kernel_limits_raise_value_errors():
    x, q, params = layer_inputs(1, 5, 72, 3, D=32, r=8, device=DEV)  # 72 is not a multiple of 16
    with pytest.raises(ValueError, match=r"x: the fused layer needs d a multiple of 16.*\(1, 5, 72\).*path='split'"):
        fused_layer.nearl_layer(x, q, params, path="fused")  # asked for; without, the split path takes it
    x, q, params = layer_inputs(1, 5, 32, 65, D=32, r=8, device=DEV)
    with pytest.raises(ValueError, match="at most 64 queries, got M=65"):
        ops.nearl_layer(x, q, params, impl="triton")


def test_fake_implementations_give_the_right_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 32, dtype=torch.bfloat16)
        a, cc, cbar = torch.empty(2, 32, 3), torch.empty(2, 3, 32), torch.empty(2, 3)
        kabs, w_v = torch.empty(2, 32, 12), torch.empty(32, 16)
        out, cos2, u_all, lse, prods, stats = fused.layer_tokens_fwd(
            x, a, cc, cbar, torch.empty(()), kabs, w_v, list(fused.small_products(a, cc, kabs, w_v)), None, "soft")
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert cos2.shape == (2, 7) and u_all.shape == (2, 12, 16) and lse.shape == (2, 12)
        assert prods.shape == (2, 7, 2 * 3 + 12 + 16) and stats.shape == (2, 5, 7)  # kept for the backward


def test_head_diagonal_and_absorbed_keys_match_the_per_head_statement():
    B, M, D, d, H = 2, 3, 8, 5, 4
    qh, w_k, xa = torch.randn(B, M, D), torch.randn(d, D), torch.randn(B, 6, d)
    kabs = fused.absorbed_keys(fused.block_queries(qh, H), w_k)  # (B, d, H*M)
    scores = xa @ kabs
    dh = D // H
    for h in range(H):
        cols = slice(h * dh, (h + 1) * dh)
        want = (xa @ w_k[:, cols]) @ qh[:, :, cols].transpose(1, 2) / dh ** 0.5
        torch.testing.assert_close(scores[..., h * M:(h + 1) * M], want)
    u_all = torch.randn(B, H * M, D)
    u = fused.head_diagonal(u_all, H)
    for h in range(H):
        cols = slice(h * dh, (h + 1) * dh)
        assert torch.equal(u[:, :, cols], u_all[:, h * M:(h + 1) * M, cols])


def test_block_queries_gradient_is_the_masked_products():
    """block_queries' own backward (the diagonal blocks of the gradient) against gradcheck's
    finite differences, float64, with a gradient that is non-zero off the diagonal blocks too."""
    qh = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fused.block_queries(t, 4), (qh,), atol=1e-9, rtol=1e-7)  # linear: exact


def test_custom_op_path_equals_the_eager_path_forward_and_backward(monkeypatch):
    x, q, params = layer_inputs(2, 40, 48, 5, D=32, r=8, device=DEV)
    mask = padding_mask(2, 40).to(DEV)
    up = upstream_for(2, 40, 48, 5, 32, "soft")
    eager_out, eager_grad = run("triton", x, q, params, mask, "soft", up)
    # force the branch torch.compile takes, without compiling (patching torch.compiler.is_compiling
    # itself made dynamo refuse it in the next test that compiles)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "compiling", lambda: True)
        op_out, op_grad = run("triton", x, q, params, mask, "soft", up)
    for u, v in zip(eager_out, op_out):
        assert torch.equal(u, v)
    for k in eager_grad:
        assert torch.equal(eager_grad[k], op_grad[k]), k


def test_torch_compile_traces_the_layer_without_a_graph_break():
    x, q, params = layer_inputs(2, 20, 32, 4, D=32, r=8, device=DEV)
    mask = padding_mask(2, 20).to(DEV)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, q, mask, params):  # check_mask_rows=False: the row check reads the mask (a sync)
        return ops.nearl_layer(x, q, params, mask=mask, impl="triton", check_mask_rows=False)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(x, q, mask, params)
    want = f(x, q, mask, params)
    assert len(graphs) == 1
    assert sum("layer_tokens_fwd" in str(n.target) for n in graphs[0].graph.nodes) == 1
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M,D,fused_expected", [(16, 128, True), (33, 128, False), (8, 256, False)])
def test_large_query_banks_take_the_split_path_and_stay_accurate(monkeypatch, M, D, fused_expected):
    """H*M > 64 or D > 128 would spill in the fused layer kernels: those run the fused OCA kernels
    and the query update in torch. Checked by the kernels actually launched, and against float64."""
    launched = []

    def record(kernel, grid, args, kwargs):
        launched.append(kernel.__name__)
        nearl_kernels.runtime.run(kernel, grid, args, kwargs)

    B, N, d, orth, dtype = 2, 40, 48, "hard", torch.bfloat16
    x, q, params = layer_inputs(B, N, d, M, D=D, r=8, dtype=dtype, batched_q=True, device=DEV)
    mask = padding_mask(B, N).to(DEV)
    up = upstream_for(B, N, d, M, D, orth)
    want = precision_bar.run_layer("float64", x, q, params, mask, orth, up)
    with nearl_kernels.runtime.instrumented(hook=record):
        got = precision_bar.run_layer(triton_layer, x, q, params, mask, orth, up)
    assert ("layer_fwd_kernel" in launched) == fused_expected, launched
    assert "_oca_fwd_kernel" in launched or fused_expected
    # bfloat16: SPEC 7's bar (the split path's query update takes 16-bit operands)
    peer = precision_bar.run_layer("peer", x, q, params, mask, orth, up)
    gate = precision_bar.ulp_sensitivity(x, q, params, mask, orth, up)
    for name, (e, bar) in precision_bar.bars(got, peer, want, {"gate": gate}).items():
        assert e <= bar, (name, e, bar)


def triton_layer(x, q, p, mask, orth):
    return ops.nearl_layer(x, q, p, mask=mask, orth=orth, impl="triton")


def test_what_spills_takes_the_split_path(monkeypatch):
    """What spills in the fused kernels takes the split path: M > 16 anywhere, float32 x on sm_80."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("NEARL_TILING", "a100")
    assert fused.fused_supported(64, 128, torch.bfloat16, cpu, M=16)
    assert not fused.fused_supported(64, 128, torch.float32, cpu, M=16)
    monkeypatch.setenv("NEARL_TILING", "h100")
    assert fused.fused_supported(64, 128, torch.float32, cpu, M=16)
    assert not fused.fused_supported(64, 128, torch.bfloat16, cpu, M=64)  # H = 1
    assert not fused.fused_supported(128, 128, torch.bfloat16, cpu, M=32)  # H*M > 64


@pytest.mark.parametrize("impl,tiling", [("reference", None), ("triton", None), ("triton", "h100")])
def test_nan_in_masked_tokens_never_reaches_the_queries(impl, tiling, monkeypatch):
    """Padding positions may hold anything (NaN from a broken tower, garbage): a masked token is not
    attended, and 0 * NaN would still be NaN, so it must not be read at all (issue 24, item 8)."""
    if tiling:
        monkeypatch.setenv("NEARL_TILING", tiling)
    x, q, params = layer_inputs(2, 40, 32, 4, D=16, r=4, heads=2, device=DEV)
    mask = padding_mask(2, 40).to(DEV)
    x_clean, q_clean = ops.nearl_layer(x, q, params, mask=mask, impl=impl)
    x_out, q_out = ops.nearl_layer(x.masked_fill(~mask[..., None], float("nan")), q, params, mask=mask, impl=impl)
    assert torch.isfinite(q_out).all()
    torch.testing.assert_close(q_out, q_clean, rtol=0, atol=0)
    torch.testing.assert_close(x_out[mask], x_clean[mask], rtol=0, atol=0)
