"""The fused OCA kernels (kernels/oca.py) against the float64 reference (nearl/ops/reference.py).

Runs on the Triton CPU interpreter when there is no GPU (tests/conftest.py). Every case checks
the forward and every gradient (x, a, c, gate, and the cos^2 upstream for orth="soft") with random
upstream gradients:
  - float32: norm-relative error ||got - ref|| / ||ref|| <= 1e-4 against float64, plus a max-abs
    sanity bound;
  - bfloat16 / float16: error <= 2x the error of the PyTorch reference run in that same dtype,
    plus a small floor.
Under the interpreter the launcher picks one big program per sample; `gpu_config` cases run with
NEARL_TILING=h100, the configuration an H100 runs (128- and 256-token tiles, 16/32-column chunks, several
chunks, tiles and token splits), so the chunk loops, masks and partial sums are exercised too.
"""
from __future__ import annotations

import math

import pytest
import torch

from nearl_kernels import oca as K
from nearl_kernels import runtime
from nearl import ops
from nearl.ops import reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or runtime.interpreting()),
                                reason="needs CUDA or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 1.2e-7, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def make_view(shape, dtype, kind, gen, scale=1.0, shift=0.0):
    """A tensor of `shape` with the given memory layout: "contig", "transposed" (last two axes
    swapped in memory), "sliced" (a window of a wider buffer) or "strided" (every other element
    of the last axis)."""
    B, R, C = shape
    if kind == "contig":
        base = torch.randn(B, R, C, generator=gen)
        view = lambda t: t  # noqa: E731
    elif kind == "transposed":
        base = torch.randn(B, C, R, generator=gen)
        view = lambda t: t.transpose(1, 2)  # noqa: E731
    elif kind == "sliced":
        base = torch.randn(B, R + 3, C + 16, generator=gen)
        view = lambda t: t[:, 2:R + 2, 8:C + 8]  # noqa: E731
    elif kind == "strided":
        base = torch.randn(B, R, 2 * C, generator=gen)
        view = lambda t: t[:, :, ::2]  # noqa: E731
    else:
        raise ValueError(kind)
    t = view((base * scale + shift).to(dtype).to(DEV))
    assert t.shape == (B, R, C)
    assert kind == "contig" or not t.is_contiguous()
    return t


def make_inputs(B, N, d, M, dtype, pdtype, x_view="contig", ac_view="contig", seed=0, shift=0.3):
    gen = torch.Generator().manual_seed(seed)
    x = make_view((B, N, d), dtype, x_view, gen, scale=1.5, shift=shift)
    # scores of order a few units so the softmax is neither flat nor one-hot
    a = make_view((B, d, M), pdtype, ac_view, gen, scale=2.0 / math.sqrt(d))
    c = make_view((B, M, d), pdtype, ac_view, gen, scale=0.7)
    gate = torch.tensor(0.8, dtype=pdtype, device=DEV)
    return x, a, c, gate


def run(fn, inputs, orth, upstream, dtype_out):
    """Forward + backward of fn; returns (out, cos2, grads) with cos2 None unless orth="soft"."""
    leaves = [t.detach().clone().requires_grad_(True) if t.is_contiguous() else
              _strided_leaf(t) for t in inputs]
    res = fn(*leaves, orth=orth)
    out, cos2 = (res if orth == "soft" else (res, None))
    assert out.dtype == dtype_out and out.shape == inputs[0].shape
    if upstream["dout"] is None:  # out.sum(): an expanded, stride-0 upstream gradient
        loss = out.float().sum() if out.dtype != torch.float64 else out.sum()
    else:
        loss = (out * upstream["dout"].to(out.dtype)).sum()
    if cos2 is not None:
        assert cos2.shape == inputs[0].shape[:2]
        loss = loss + (cos2 * upstream["dcos2"].to(cos2.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    for g, t in zip(grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
    return out.detach(), (cos2.detach() if cos2 is not None else None), grads


def _strided_leaf(t):
    """A leaf with the same (non-contiguous) strides as t."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    leaf.copy_(t)
    return leaf.requires_grad_(True)


def rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name, got, ref64, lowp, ref_lp=None, floor=0.0):
    """lowp None: the float32 criterion. Else the half-precision one: within twice the error of
    the PyTorch reference run in the same dtypes (ref_lp), plus `floor`."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if ref64.abs().max() == 0:  # e.g. dA with M = 1: the softmax is constant
        assert got.abs().max() <= 1e-6, f"{name}: expected 0, got max |.| = {got.abs().max()}"
        return
    err = rel(got, ref64)
    scale = ref64.abs().max().item()
    maxabs = (got.double() - ref64.double()).abs().max().item()
    if lowp is None:
        assert err <= 1e-4, f"{name}: relative error {err:.3g} > 1e-4"
        assert maxabs <= 1e-3 * scale, f"{name}: max abs error {maxabs:.3g} vs max |ref| {scale:.3g}"
    else:
        err_ref = rel(ref_lp, ref64)
        assert err <= 2 * err_ref + floor, (f"{name}: relative error {err:.3g} > 2 x reference's "
                                            f"{err_ref:.3g} + {floor:.3g}")
        assert maxabs <= 0.05 * scale, f"{name}: max abs error {maxabs:.3g} vs max |ref| {scale:.3g}"


def compare(B, N, d, M, orth, dtype, pdtype=None, x_view="contig", ac_view="contig",
            upstream="randn", seed=0, fn=None, shift=0.3):
    pdtype = pdtype or dtype
    fn = fn or K.oca
    inputs = make_inputs(B, N, d, M, dtype, pdtype, x_view, ac_view, seed, shift)
    gen = torch.Generator().manual_seed(seed + 1)
    # upstream gradients rounded to the output dtypes, the same values for every run
    up = {"dout": torch.randn(B, N, d, generator=gen).to(dtype).to(DEV) if upstream == "randn" else None,
          "dcos2": torch.randn(B, N, generator=gen).to(DEV)}
    out, cos2, grads = run(fn, inputs, orth, up, dtype)
    inputs64 = [t.detach().double() for t in inputs]
    out64, cos64, grads64 = run(reference.oca, inputs64, orth, up, torch.float64)
    lowp = None if dtype == torch.float32 else dtype
    lp = run(reference.oca, inputs, orth, up, dtype) if lowp else (None, None, [None] * 4)
    # Half-precision x: results kept in a wider dtype (cos2; the gradients of float32 a, c,
    # gate) are only asked to be accurate to a quarter of x's rounding (on a GPU the kernel's
    # products run in tf32, 2^-11); results in x's dtype get a 1e-5 floor.
    wide = 0.25 * EPS[dtype]
    check("out", out, out64, lowp, lp[0], floor=1e-5)
    if orth == "soft":
        assert cos2.dtype == torch.float32
        check("cos2", cos2, cos64, lowp, lp[1], floor=wide)
    for i, name in enumerate(["x", "a", "c", "gate"]):
        gdt = inputs[i].dtype
        floor = 1e-5 if gdt == dtype else wide
        if name == "gate":
            floor += 0.5 * EPS[gdt]
        check(f"d{name}", grads[i], grads64[i], lowp, lp[2][i], floor=floor)
    return out, cos2, grads


@pytest.fixture
def gpu_config(monkeypatch):
    """The launchers pick exactly what they pick for an H100 (NEARL_TILING=h100), on any device."""
    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.delenv("NEARL_SM_COUNT", raising=False)


@pytest.fixture
def poison(poisoned_outputs):
    """Every buffer a launcher allocates starts as NaN, so an unwritten element shows."""


# ------------------------------------------------------------------------------------------
# accuracy against float64
# ------------------------------------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

CASES = [  # B, N, d, M, orth, x dtype, a/c/gate dtype, x layout, a/c layout, upstream
    (2, 77, 80, 5, "hard", F32, F32, "transposed", "strided", "randn"),
    (1, 1, 16, 1, "soft", F32, F32, "contig", "contig", "randn"),
    (2, 197, 768, 16, "hard", BF16, F32, "contig", "contig", "randn"),  # ViT-B/16 layer, bf16 x
    (2, 197, 768, 16, "soft", F32, F32, "sliced", "transposed", "randn"),
    (3, 77, 512, 33, "none", F16, F16, "contig", "transposed", "randn"),  # text tower width
    (2, 77, 512, 16, "soft", BF16, BF16, "strided", "contig", "randn"),
    (1, 197, 80, 33, "none", F32, F32, "contig", "sliced", "sum"),      # stride-0 upstream
    (2, 1, 768, 5, "hard", F16, F32, "sliced", "contig", "randn"),
    (1, 33, 64, 64, "soft", F32, F32, "contig", "contig", "randn"),     # BLOCK_M = 64
    (1, 20, 2048, 16, "hard", F32, F32, "contig", "contig", "randn"),   # d beyond 1024
]


def _id(case):
    B, N, d, M, orth, xd, pd, xv, av, up = case
    name = lambda t: str(t).replace("torch.", "")  # noqa: E731
    return f"B{B}-N{N}-d{d}-M{M}-{orth}-{name(xd)}-{name(pd)}-x_{xv}-ac_{av}-{up}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_float64_reference(case):
    B, N, d, M, orth, xd, pd, xv, av, up = case
    compare(B, N, d, M, orth, xd, pd, xv, av, up)


GPU_CASES = [  # the GPU tiling, run by the interpreter: multi-chunk, multi-tile, token splits
    # (at these batches on 132 SMs the token tiles are halved to fill the GPU: FULL_TILE_CASES
    # run the tiles of a batch that fills it)
    (2, 77, 80, 5, "hard", F32, F32, "transposed", "strided", "randn"),   # tf32x3, 16-col chunks
    (1, 130, 96, 33, "soft", F32, F32, "contig", "contig", "randn"),      # tf32x3, BLOCK_M 64
    (3, 70, 192, 16, "none", BF16, F32, "sliced", "transposed", "randn"),  # tf32, 3 col chunks
    (1, 197, 128, 64, "soft", BF16, BF16, "contig", "contig", "sum"),
    (2, 40, 64, 5, "hard", BF16, BF16, "contig", "contig", "randn"),    # small shapes, M 5 and 16
    (2, 40, 64, 16, "soft", F32, F32, "contig", "contig", "randn"),
    (2, 40, 400, 16, "hard", BF16, BF16, "contig", "transposed", "randn"),  # tf32, bwd columns 256 + 144
    (2, 300, 80, 9, "soft", BF16, F32, "strided", "contig", "randn"),  # tf32; full tiles: 256 + 44
    (2, 40, 72, 5, "hard", BF16, BF16, "contig", "contig", "randn"),  # 32-col chunks, the last 8 wide
]


@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_gpu_tiling_matches_reference(case, gpu_config, poison):
    B, N, d, M, orth, xd, pd, xv, av, up = case
    gpu_tiles, n_sm, cc = runtime.tiling(torch.device(DEV))
    assert gpu_tiles and (n_sm, cc) == (132, 90)
    cfg = K._oca_config(B, N, d, M, K._precision(torch.empty(0, dtype=xd), M, cc), False, n_sm, cc)
    assert cfg.cols_splits > 1 or B * math.ceil(d / cfg.cols_block_d) >= 4 * 132
    compare(B, N, d, M, orth, xd, pd, xv, av, up)


# GPU_CASES with the tiles of a batch that fills the GPU (NEARL_SM_COUNT=1: no tile is halved)
FULL_TILE_CASES = [case for case in GPU_CASES if case[1] > 64]


# ... and an A100's 256-token tiles (tf32 at BLOCK_M 16 past 128 tokens; an H100 takes 128 there)
@pytest.mark.parametrize("case,tiling", [(case, "h100") for case in FULL_TILE_CASES]
                         + [(case, "a100") for case in FULL_TILE_CASES if case[1] > 256],
                         ids=lambda v: v if isinstance(v, str) else _id(v))
def test_gpu_tiling_at_a_full_batch_matches_reference(case, tiling, monkeypatch, poison):
    B, N, d, M, orth, xd, pd, xv, av, up = case
    monkeypatch.setenv("NEARL_TILING", tiling)
    monkeypatch.setenv("NEARL_SM_COUNT", "1")
    n_sm, cc = runtime.tiling(torch.device(DEV))[1:]
    cfg = K._oca_config(B, N, d, M, K._precision(torch.empty(0, dtype=xd), M, cc), False, n_sm, cc)
    assert cfg.fwd_block_n >= 128 and cfg.rows_block_n >= 128 or M > 32, cfg
    compare(B, N, d, M, orth, xd, pd, xv, av, up)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_rows_with_a_large_mean(dtype, gpu_config):
    """Residual streams: a row mean 200 times its spread. The kernels sum shifted rows, so the
    statistics and LN(x) @ A do not cancel (E[x^2] - E[x]^2 in float32 would lose 4 digits)."""
    compare(2, 40, 96, 5, "hard", dtype, F32, shift=300.0)
    compare(1, 33, 64, 16, "soft", dtype, F32, shift=-300.0)


def test_public_op_uses_kernel(monkeypatch):
    """ops.oca(impl="triton") goes through nearl_kernels.oca.oca and gives the same numbers."""
    calls = []
    orig = K.oca
    monkeypatch.setattr(K, "oca", lambda *a, **k: calls.append(1) or orig(*a, **k))
    compare(2, 77, 80, 5, "soft", F32, fn=lambda *t, orth: ops.oca(*t, orth=orth, impl="triton"))
    assert calls


# ------------------------------------------------------------------------------------------
# every element written, determinism, exactness, errors
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orth", ["hard", "soft", "none"])
def test_every_output_element_written(orth, poison):
    # N = 77 and d = 80 leave masked rows and columns in every tile
    compare(2, 77, 80, 5, orth, F32, x_view="sliced")


@pytest.mark.parametrize("tiling", ["interpreter", "gpu"])
def test_backward_is_deterministic(tiling, request):
    if tiling == "gpu":
        request.getfixturevalue("gpu_config")
    x, a, c, gate = make_inputs(1, 150, 96, 16, F32, F32)
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(x.shape, generator=gen).to(DEV)
    dcos2 = torch.randn(x.shape[:2], generator=gen).to(DEV)
    runs = [K.oca_bwd(dout, dcos2, x, a, c, gate, "soft") for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("orth", ["hard", "soft", "none"])
def test_zero_c_returns_x_exactly(orth):
    """W_up = 0 (the initial state) gives C = 0: out must be x bit for bit, cos^2 = 0."""
    x, a, _, gate = make_inputs(2, 77, 80, 5, BF16, F32)
    c = torch.zeros(2, 5, 80, device=DEV)
    res = K.oca(x, a, c, gate, orth=orth)
    out = res[0] if orth == "soft" else res
    assert torch.equal(out, x)
    if orth == "soft":
        assert torch.equal(res[1], torch.zeros(2, 77, device=DEV))


def test_kernel_limits_raise_value_error():
    x, a, c, gate = make_inputs(1, 4, 16, 2, F32, F32)
    big = torch.zeros(1, 4, K.MAX_D + 16, device=DEV)
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, %d\)" % (K.MAX_D + 16)):
        ops.oca(big, torch.zeros(1, K.MAX_D + 16, 2, device=DEV),
                torch.zeros(1, 2, K.MAX_D + 16, device=DEV), gate, impl="triton")
    with pytest.raises(ValueError, match=r"a has shape \(1, 16, 65\)"):
        K.oca(x, torch.zeros(1, 16, 65, device=DEV), torch.zeros(1, 65, 16, device=DEV), gate)
    with pytest.raises(ValueError, match="M=65"):
        K._oca_config(1, 4, 16, 65, "tf32", False)


def test_float64_goes_to_reference():
    """ops routes float64 (gradcheck) to the reference; the kernel layer itself refuses it."""
    x, a, c, gate = (t.double() for t in make_inputs(1, 5, 16, 3, F32, F32))
    assert torch.equal(ops.oca(x, a, c, gate, orth="hard", impl="triton"), reference.oca(x, a, c, gate, orth="hard"))
    with pytest.raises(ValueError, match="float64"):
        K.oca(x, a, c, gate, orth="hard")


# ------------------------------------------------------------------------------------------
# the custom ops behind torch.compile
# ------------------------------------------------------------------------------------------

def test_custom_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 32, dtype=torch.bfloat16)
        a = torch.empty(2, 32, 5)
        c = torch.empty(2, 5, 32)
        gate = torch.empty(())
        for orth in ("hard", "soft", "none"):
            out, cos2 = torch.ops.nearl.oca_fwd(x, a, c, gate, orth)
            assert out.shape == x.shape and out.dtype == x.dtype
            assert cos2.dtype == torch.float32
            assert cos2.shape == ((2, 7) if orth == "soft" else (0,))
        dx, da, dc, dg = torch.ops.nearl.oca_bwd(torch.empty_like(x), None, x, a, c, gate, "soft")
        assert (dx.shape, dx.dtype) == (x.shape, x.dtype)
        assert (da.shape, da.dtype) == (a.shape, a.dtype)
        assert (dc.shape, dc.dtype) == (c.shape, c.dtype)
        assert (dg.shape, dg.dtype) == (gate.shape, gate.dtype)


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_custom_op_opcheck(orth):
    """torch.library.opcheck: schema, fake tensor, autograd registration, AOT dispatch."""
    x, a, c, gate = make_inputs(1, 9, 32, 3, F32, F32)
    args = [t.detach().clone().requires_grad_(True) for t in (x, a, c, gate)]
    torch.library.opcheck(torch.ops.nearl.oca_fwd.default, (*args, orth))


def test_custom_op_autograd_matches_function():
    """The custom-op path (used on CUDA) and the autograd.Function path agree."""
    x, a, c, gate = make_inputs(2, 17, 48, 4, F32, F32)
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(x.shape, generator=gen).to(DEV)
    dcos2 = torch.randn(x.shape[:2], generator=gen).to(DEV)
    results = []
    for path in ("op", "function"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, c, gate)]
        if path == "op":
            out, cos2 = torch.ops.nearl.oca_fwd(*leaves, "soft")
        else:
            out, cos2 = K._OcaFunction.apply(*leaves, "soft")
        grads = torch.autograd.grad((out * dout).sum() + (cos2 * dcos2).sum(), leaves)
        results.append((out, cos2, *grads))
    for r1, r2 in zip(*results):
        assert torch.equal(r1, r2)


@pytest.mark.parametrize("orth", ["hard", "soft"])
def test_torch_compile_fullgraph(orth):
    """Under torch.compile the op is one graph node (fullgraph=True: a graph break would raise);
    forward and backward match eager. aot_eager: AOTAutograd traces the fake and autograd rules
    without needing a C++ or GPU compiler for Inductor's code."""
    x, a, c, gate = make_inputs(2, 13, 48, 4, F32, F32)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(x.shape, generator=gen).to(DEV)
    dcos2 = torch.randn(x.shape[:2], generator=gen).to(DEV)

    def loss_fn(x, a, c, gate):
        res = K.oca(x, a, c, gate, orth=orth)
        if orth == "soft":
            return (res[0] * dout).sum() + (res[1] * dcos2).sum()
        return (res * dout).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, c, gate)]
        loss = fn(*leaves)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for r1, r2 in zip(*results):
        torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-6)


def tf32_peer_oca(x, a, c, gate, orth="hard"):
    """OCA in float32 with TF32 products, as torch.matmul runs them at "high" precision on a GPU
    (operands truncated to TF32, tests/precision_bar.tf32)."""
    from precision_bar import tf32
    xf = x.float()
    p = torch.softmax(tf32(reference.layer_norm(xf)) @ tf32(a.float()), dim=-1)
    update, cos2 = reference.orth_update(tf32(p) @ tf32(c.float()), xf, orth)
    out = xf + gate.float() * update
    return (out, cos2) if orth == "soft" else out


@pytest.mark.parametrize("orth", ["soft"])  # cos2 too
def test_float32_below_highest_precision_takes_tf32(orth, gpu_config, gpu_tf32):
    """float32 x follows torch.get_float32_matmul_precision() (SPEC 7): at "high" one TF32
    product (the tensor cores' truncation emulated) instead of tf32x3's three, within twice the
    error of the same math with TF32 products."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        inputs = make_inputs(2, 197, 768, 16, F32, F32)
        assert K._precision(inputs[0]) == "tf32"
        gen = torch.Generator().manual_seed(1)
        up = {"dout": torch.randn(2, 197, 768, generator=gen).to(DEV),
              "dcos2": torch.randn(2, 197, generator=gen).to(DEV)}
        got = run(K.oca, inputs, orth, up, F32)
        peer = run(tf32_peer_oca, inputs, orth, up, F32)
    finally:
        torch.set_float32_matmul_precision(saved)
    assert K._precision(inputs[0]) == "tf32x3"
    want = run(reference.oca, [t.detach().double() for t in inputs], orth, up, torch.float64)
    pairs = [("out", got[0], peer[0], want[0])]
    pairs += [(f"d{n}", g, p, w) for n, g, p, w in zip("xacg", got[2], peer[2], want[2])]
    if orth == "soft":
        pairs.append(("cos2", got[1], peer[1], want[1]))
    for name, g, p, w in pairs:
        assert rel(g, w) <= 2 * rel(p, w) + 1e-6, (name, rel(g, w), rel(p, w))
