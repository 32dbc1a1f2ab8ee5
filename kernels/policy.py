"""What every kernel shares: the math's epsilons, the orth-mode codes, the size limits and the
dot-precision policy. Plain Python (no Triton import): `nearl.reference` and the launchers read it
too; `tiles.py` holds the Triton constants made from it."""
import torch

LN_EPS = 1e-5  # LayerNorm without affine parameters (SPEC 2)
ORTH_EPS = 1e-6  # the projection's <X, X> + eps (SPEC 3.1)
COS2_EPS = 1e-12  # keeps cos^2 finite (and 0) when Delta = 0, as it is at init

# The orth modes as the kernels' ORTH constexpr sees them.
ORTH_CODES = {"none": 0, "hard": 1, "soft": 2}

# Rows are streamed in column chunks, so nothing but loop trip counts depends on d: this only bounds
# what the tests promise (they run d up to 2048). M above 64 takes the reference.
MAX_D = 8192
MAX_M = 64


def fp32_accurate_products(dtype: torch.dtype) -> bool:
    """The one precision policy for the kernels' tl.dot products (their sums are float32 always).

    bfloat16 x: no; TF32 products. x is exact in TF32, and the float32 operands formed from it
    (LN(x), P, A, C, keys) are rounded to TF32's unit roundoff 2^-11, eight times finer than the
    2^-8 of a bfloat16 result, so the result stays within bfloat16's own error.
    float32 and float16 x: yes. The tests ask 1e-4 of float32, and float16's unit roundoff is 2^-11,
    as coarse as TF32's, so TF32 products could double the error of a float16 result.
    How a kernel gets float32 accuracy is its own affair, a matter of registers: the OCA kernels
    run three TF32 products on a hi/lo split ("tf32x3"), the layer kernels IEEE float32 products.
    """
    return dtype != torch.bfloat16
