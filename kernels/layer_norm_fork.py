"""The backward of a tensor used twice, as itself and through a LayerNorm, in one kernel:

    dx = d_res + LN'(x)^T dy        (LN without affine parameters, eps policy.LN_EPS)

The split path uses the OCA output both ways: it is the layer's output and, normalised, what the
queries read (`nearl_kernels.oca_norm`). Autograd would run LayerNorm's backward (read dy and x,
write its gradient) and then add the two gradients (read both, write the sum): 6 passes over
(B, N, d). This kernel reads dy, x and d_res once and writes dx once: 4 passes, and one rounding to
x's dtype instead of two.

1. `_ln_fork_bwd_kernel`, grid (row tiles, B): a program holds ROWS whole rows of x, dy and d_res
   (no products, so no tensor-core layout binds the tile, and nothing is loaded twice), works out
   each row's LayerNorm statistics in float32 and writes
   dx = d_res + rstd (dy - mean(dy) - xhat mean(dy xhat)).
2. `ln_fork_bwd`, the launcher; `_fork_config` picks every block size.
The Function and the public op that use it are `nearl_kernels.oca_norm`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import policy, runtime
from .casting import cast_out
from .runtime import interpreting

_LN_EPS = tl.constexpr(policy.LN_EPS)


# --------------------------------------------------------------------------------------------
# 1. kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _ln_fork_bwd_kernel(X, DY, DRES, DX, N, D,
                        s_xb, s_xn, s_xd, s_yb, s_yn, s_yd, s_rb, s_rn, s_rd, s_ob, s_on, s_od,
                        HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROUND_BY_HAND: tl.constexpr):
    """dx = d_res + LN'(x)^T dy for ROWS whole rows of sample b (see the module docstring)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ok = (rows < N)[:, None] & col_ok[None, :]
    r, c = rows[:, None], cols[None, :]
    x = tl.load(X + b * s_xb + r * s_xn + c * s_xd, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + b * s_yb + r * s_yn + c * s_yd, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + _LN_EPS)
    xhat = xc * rstd[:, None]
    m1 = tl.sum(dy, axis=1) / D
    m2 = tl.sum(dy * xhat, axis=1) / D
    dx = rstd[:, None] * (dy - m1[:, None] - xhat * m2[:, None])
    if HAS_RES:
        dx += tl.load(DRES + b * s_rb + r * s_rn + c * s_rd, mask=ok, other=0.0).to(tl.float32)
    tl.store(DX + b * s_ob + r * s_on + c * s_od, cast_out(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=ok)


# --------------------------------------------------------------------------------------------
# 2. launcher
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForkConfig:
    ROWS: int     # rows a program
    BLOCK_D: int  # a whole row, padded to a power of two (masked)
    warps: int


def _fork_config(N: int, d: int, interpret: bool) -> ForkConfig:
    """Every block size of the kernel, chosen here.

    GPU: a program holds 4,096 elements of each of its three inputs (ROWS whole rows: 4 of
    ViT-B/16's 768, padded to 1,024; 8 of the text tower's 512), 16 a thread at 8 warps, so three
    tiles and their float32 temporaries stay far under the 128 registers that 16 warps an SM
    allow. A row wider than 4,096 takes a program to itself with 16 elements a thread (up to 16
    warps: d <= 8,192, `policy.MAX_D`). Whole rows are loaded at once, with no loop: every
    request of a program is in flight together, and ViT-B/16 at B = 256 makes 12,800 programs.
    Interpreter: each program is a sequence of numpy steps, so the fewest, largest programs."""
    block_d = max(16, triton.next_power_of_2(d))
    budget = 65536 if interpret else 4096
    rows = max(1, min(triton.next_power_of_2(max(N, 1)), budget // block_d))
    warps = min(16, max(4, rows * block_d // 512))
    return ForkConfig(rows, block_d, warps)


def ln_fork_bwd(dy: torch.Tensor, x: torch.Tensor, dres: Optional[torch.Tensor]) -> torch.Tensor:
    """dy, x, dres (B, N, d), any strides (dres None: no gradient from the other use) -> dx (B, N, d)
    in x's dtype: dres + the gradient through LayerNorm (no affine, eps policy.LN_EPS) of dy."""
    B, N, d = x.shape
    if d > policy.MAX_D:
        raise ValueError(f"x has shape {tuple(x.shape)}: the LayerNorm fork kernel takes d <= {policy.MAX_D}")
    gpu_tiles = runtime.tiling(x.device)[0]
    cfg = _fork_config(N, d, not gpu_tiles)
    dx = runtime.empty((B, N, d), dtype=x.dtype, device=x.device)
    res = dres if dres is not None else dy  # not read without HAS_RES
    runtime.launch(_ln_fork_bwd_kernel, (triton.cdiv(N, cfg.ROWS), B),
                   x, dy, res, dx, N, d, *x.stride(), *dy.stride(), *res.stride(), *dx.stride(),
                   HAS_RES=dres is not None, ROWS=cfg.ROWS, BLOCK_D=cfg.BLOCK_D,
                   ROUND_BY_HAND=interpreting(), num_warps=cfg.warps, num_stages=1)
    return dx


__all__ = ["ln_fork_bwd"]
