"""Output casts shared by the kernels.

The triton interpreter (3.6, 3.8 and 3.9 seen) converts float32 to bfloat16 by truncation, the GPU by rounding to
nearest even (and the interpreter ignores `fp_downcast_rounding`). Truncation doubles the rounding
error, which would make the CPU tests measure the interpreter rather than the kernel, so under the
interpreter we round to nearest even by hand before the (then exact) truncating cast. On the GPU
ROUND_BY_HAND is False and this is a plain `.to(dtype)`.
"""
import triton
import triton.language as tl


@triton.jit
def cast_out(x, dtype: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    if ROUND_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + ((bits >> 16) & 1) + 0x7FFF  # ties to even, as the hardware does
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)
