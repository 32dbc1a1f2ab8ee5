"""Triton helpers and constants shared by the kernels: tile loads, the LayerNorm statistics of
shifted rows, the orth-mode codes (from `policy`)."""
import triton
import triton.language as tl

from . import policy

ORTH_NONE = tl.constexpr(policy.ORTH_CODES["none"])
ORTH_HARD = tl.constexpr(policy.ORTH_CODES["hard"])
ORTH_SOFT = tl.constexpr(policy.ORTH_CODES["soft"])


@triton.jit
def load_tile(base, stride_r, stride_c, rows, cols, rows_ok, cols_ok):
    """The (rows x cols) tile at base + rows * stride_r + cols * stride_c as float32, 0 where masked."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def first_chunk_mean(x0, d, BLOCK: tl.constexpr):
    """Each row's mean over its first chunk x0 (BLOCK columns, masked to d): the shift s that the
    kernels subtract before summing. Within about a standard deviation of the row mean, so the
    sums of (x - s) and its squares do not cancel when a row's mean is large against its spread."""
    return tl.sum(x0, 1) / tl.minimum(d, BLOCK).to(tl.float32)


@triton.jit
def last_chunk_start(d, BLOCK: tl.constexpr):
    """The first column of a row's last BLOCK-column chunk (0 when d <= BLOCK)."""
    return (d - 1) // BLOCK * BLOCK


@triton.jit
def shifted_row_stats(s1, s2, shift, d, eps):
    """From s1 = sum(x - shift) and s2 = sum((x - shift)^2) over a row of d: (mean, mean - shift,
    sum of (x - mean)^2, rstd of LayerNorm with eps, sum of x^2)."""
    dm = s1 / d
    m2 = tl.maximum(s2 - s1 * dm, 0.0)  # sum of (x - mean)^2
    rstd = 1.0 / tl.sqrt(m2 / d + eps)
    xx = s2 + shift * (2.0 * s1 + d * shift)
    return shift + dm, dm, m2, rstd, xx
