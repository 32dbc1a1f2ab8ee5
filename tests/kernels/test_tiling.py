"""NEARL_TILING / NEARL_SM_COUNT (kernels/runtime.py): any device runs a GPU's launch configurations.

That the kernels are right under that tiling is tested in test_oca_kernel.py (`gpu_config`) and
test_layer_kernel.py (`test_h100_tiling_matches_float64`)."""
import pytest
import torch

from nearl_kernels import runtime
from nearl import ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or runtime.interpreting()),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name,value", [("NEARL_TILING", "v100"), ("NEARL_TILING", "sm90"),
                                        ("NEARL_SM_COUNT", "0"), ("NEARL_SM_COUNT", "many"),
                                        ("NEARL_SM_COUNT", "-4")])
def test_bad_tiling_environment_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        runtime.tiling(torch.device("cpu"))
    x = torch.randn(1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match=name):  # the launchers read it: a clear error, not a crash
        ops.oca(x, torch.randn(1, 16, 2, device=DEV), torch.randn(1, 2, 16, device=DEV),
                torch.tensor(0.5, device=DEV), impl="triton")


def test_tiling_environment_values(monkeypatch):
    monkeypatch.delenv("NEARL_TILING", raising=False)
    monkeypatch.delenv("NEARL_SM_COUNT", raising=False)
    if runtime.interpreting():
        assert runtime.tiling(torch.device("cpu")) == (False, 132, 90)  # the interpreter's own tiles
    monkeypatch.setenv("NEARL_TILING", "A100")
    assert runtime.tiling(torch.device("cpu")) == (True, 108, 80)
    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.setenv("NEARL_SM_COUNT", "3")
    assert runtime.tiling(torch.device("cpu")) == (True, 3, 90)


def test_launchers_follow_the_tiling(monkeypatch):
    """The launches themselves (captured, not run): token tiles from NEARL_TILING, token splits
    from NEARL_SM_COUNT."""
    from nearl_kernels import layer as L
    from nearl_kernels import oca as K

    launches = []

    def capture(kernel, grid, args, kwargs):
        launches.append((kernel.__name__, grid, kwargs.get("BLOCK_N")))
    B, N, d, M = 2, 300, 64, 16
    # bf16 x: the tiles of the common case (float32 x takes 16-token layer tiles: IEEE products)
    x = torch.randn(B, N, d).to(torch.bfloat16)
    a, c, gate = torch.randn(B, d, M), torch.randn(B, M, d), torch.tensor(0.5)
    kabs, w_v = torch.randn(B, d, 4 * M), torch.randn(d, 32)

    def run():
        launches.clear()
        with runtime.instrumented(hook=capture):
            K.oca_fwd(x, a, c, gate, "hard")
            K.oca_bwd(x, None, x, a, c, gate, "hard")
            L.layer_fwd(x, L.LayerOperands(a, c, c.sum(-1), gate, kabs, w_v, L.small_products(a, c, kabs, w_v)),
                        None, "hard")
        return {name: (grid, bn) for name, grid, bn in launches}

    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.setenv("NEARL_SM_COUNT", "1")
    one = run()
    assert one["_oca_fwd_kernel"][1] == 256 and one["layer_fwd_kernel"][1] == 128  # an H100's token tiles
    assert one["_oca_bwd_cols_kernel"][0][1] == 2  # splits: floor(4 programs per SM / (B x 1 chunk))
    assert one["layer_fwd_kernel"][0][0] == 3  # one program per 128-token tile, whatever the SMs
    # M not a multiple of 16: A's masked loads spilled at 128 tokens (triton 3.6), so 64
    assert L.layer_config(B, N, d, 4, 16, 32, x.dtype, x.device).block_n == 64
    assert one["layer_attn_kernel"][0][0] == 1  # attention splits: ceil(1 program per SM / B)
    monkeypatch.setenv("NEARL_SM_COUNT", "132")
    full = run()
    assert full["_oca_bwd_cols_kernel"][0][1] == 19 and full["layer_attn_kernel"][0][0] == 10  # one per 16- and 32-token tile


@pytest.mark.skipif(not runtime.interpreting(), reason="the interpreter's products")
def test_the_interpreter_can_round_tf32_as_the_gpu(monkeypatch):
    """runtime.instrumented(tf32_as_gpu=True): TF32 products truncate their operands at 2^-10 (relative error
    about 1e-3 on random operands, not float32's 1e-7); tf32x3 and ieee stay float32-accurate."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(A, B, C, PREC: tl.constexpr):
        o = tl.arange(0, 16)
        a = tl.load(A + o[:, None] * 16 + o[None, :])
        b = tl.load(B + o[:, None] * 16 + o[None, :])
        tl.store(C + o[:, None] * 16 + o[None, :], tl.dot(a, b, input_precision=PREC))

    a, b = torch.randn(16, 16), torch.randn(16, 16)
    want = a.double() @ b.double()

    def rel(prec):
        c = torch.empty(16, 16)
        runtime.launch(dot16, (1,), a, b, c, PREC=prec)
        return ((c.double() - want).norm() / want.norm()).item()

    assert rel("tf32") < 1e-6  # by default the interpreter multiplies in float32
    with runtime.instrumented(tf32_as_gpu=True):
        assert 1e-4 < rel("tf32") < 4e-3
        assert rel("tf32x3") < 1e-6 and rel("ieee") < 1e-6
    assert rel("tf32") < 1e-6  # and again after the block


def test_small_batches_fill_the_gpu(monkeypatch):
    """B = 8 (predict, evaluate) on an H100: the token tiles are halved until the grids fill its 132
    SMs (8 ViT-B/16 programs of 256 tokens before); at B = 256 the tiles are the full ones."""
    from nearl_kernels import layer as L
    from nearl_kernels import oca as K

    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.delenv("NEARL_SM_COUNT", raising=False)
    cpu = torch.device("cpu")
    N, d, M = 197, 768, 16
    small, full = (K._oca_config(B, N, d, M, "tf32", False, 132, 90) for B in (8, 256))
    assert (full.fwd_block_n, full.rows_block_n, full.fwd_warps, full.cols_warps) == (256, 256, 16, 16)
    assert small.fwd_block_n == small.rows_block_n == 16 and 8 * -(-N // 16) >= 100
    small, full = (L.layer_config(B, N, d, M, 4 * M, 128, torch.bfloat16, cpu) for B in (8, 256))
    assert full.block_n == 128 and small.block_n == 16
    small, full = (L.layer_bwd_config(B, N, d, M, 4 * M, torch.bfloat16, cpu) for B in (8, 256))
    assert full.dout_block_n == 128 and small.dout_block_n == 16
