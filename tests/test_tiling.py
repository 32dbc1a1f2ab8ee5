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
    monkeypatch.setattr(runtime, "LAUNCH_HOOK", lambda kernel, grid, args, kwargs:
                        launches.append((kernel.__name__, grid, kwargs.get("BLOCK_N"))))
    B, N, d, M = 2, 300, 64, 4
    # bf16 x: the tiles of the common case (float32 x takes 16-token layer tiles: IEEE products)
    x = torch.randn(B, N, d).to(torch.bfloat16)
    a, c, gate = torch.randn(B, d, M), torch.randn(B, M, d), torch.tensor(0.5)
    kabs, w_v = torch.randn(B, d, 4 * M), torch.randn(d, 32)

    def run():
        launches.clear()
        K.oca_fwd(x, a, c, gate, "hard")
        K.oca_bwd(x, None, x, a, c, gate, "hard")
        L.layer_fwd(x, a, c, c.sum(-1), gate, kabs, w_v, L.small_products(a, c, kabs, w_v), None, "hard")
        return {name: (grid, bn) for name, grid, bn in launches}

    monkeypatch.setenv("NEARL_TILING", "h100")
    monkeypatch.setenv("NEARL_SM_COUNT", "1")
    one = run()
    assert one["_oca_fwd_kernel"][1] == 64 and one["layer_fwd_kernel"][1] == 32  # an H100's token tiles
    assert one["_oca_bwd_cols_kernel"][0][1] == 2  # splits: ceil(4 programs per SM / (B x 1 chunk))
    assert one["layer_fwd_kernel"][0][0] == 1  # ceil(1 program per SM / B)
    monkeypatch.setenv("NEARL_SM_COUNT", "132")
    full = run()
    assert full["_oca_bwd_cols_kernel"][0][1] == 10 and full["layer_fwd_kernel"][0][0] == 10  # one per tile
