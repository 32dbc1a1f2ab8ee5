"""Tile loads shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def load_tile(base, stride_r, stride_c, rows, cols, rows_ok, cols_ok):
    """The (rows x cols) tile at base + rows * stride_r + cols * stride_c as float32, 0 where masked."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
