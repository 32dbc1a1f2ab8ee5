"""What every kernel shares: the math's epsilons, the orth-mode codes, the size limits and the
dot-precision policy. Plain Python (no Triton import): `nearl.ops.reference` and the launchers read it
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
    """The one precision policy for the kernels' tl.dot products (their sums are float32 always),
    SPEC section 7's.

    bfloat16 x: no; TF32 products. x is exact in TF32, and the float32 operands formed from it
    (LN(x), P, A, C, keys) are rounded to TF32's unit roundoff 2^-11, eight times finer than the
    2^-8 of a bfloat16 result, so the result stays within bfloat16's own error.
    float32 x: as torch.matmul, by `torch.get_float32_matmul_precision()`: "highest" (PyTorch's
    default) yes, float32-accurate products and 1e-4 of float64; "high" or "medium" no, TF32
    products under the half-precision bar (a model trained under autocast keeps its residual
    stream, so the layer's x, in float32: this switch is how it asks for the tensor cores' rate).
    float16 x: yes. Its unit roundoff is 2^-11, as coarse as TF32's, so TF32 products could
    double the error of a float16 result.
    How a kernel gets float32 accuracy is its own affair, a matter of registers: the OCA kernels
    run three TF32 products on a hi/lo split ("tf32x3"), the layer kernels IEEE float32 products.
    """
    if dtype == torch.float32:
        return torch.get_float32_matmul_precision() == "highest"
    return dtype != torch.bfloat16


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused layer holds its per-sample matrices (A, the absorbed keys) and W_v in:
    bfloat16 for bfloat16 x (SPEC 7: 16-bit operands under flash-attention's bar), else float32.
    float16 x keeps float32 ones: its IEEE products' forward kernel spilled 4 bytes on sm_90 with
    float16 operands to convert (triton 3.8), and SPEC 7 allows, not asks."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def scratch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the layer backward's per-token scratch (P, dS and their query-side twins), the
    operands of its column kernel's products: bfloat16 for bfloat16 x (flash-attention rounds P
    and dS so), float32 otherwise (float16's range would flush small dS to 0)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# Software pipelining (Triton's num_stages) of the kernels' column and token loops on the GPU:
# with 1 stage every loop step loads, waits for its loads, then computes, so DRAM latency
# (600-1000 cycles) and the step's math add up, at one or two CTAs per SM. With 3 stages the
# loads of the next two steps are in flight (cp.async, LDGSTS in the sm_90 SASS) while a step
# computes: a 256-token x 32-column bf16 chunk is 16 kB, so two in flight per SM are about the
# 1-2 MB across 132 SMs that Little's law asks of an H100. Kernels that spill with it keep 1
# (their launchers say which); the interpreter ignores it.
PIPELINE_STAGES = 3


def tokens_to_fill(block_n: int, B: int, N: int, n_sm: int, floor: int = 16) -> int:
    """A token tile halved (down to `floor`) while a grid of B x ceil(N / tile) programs leaves
    SMs idle: at a small batch (predict, evaluate: B = 8 gives 8 ViT-B/16 programs of 256 tokens
    on 132 SMs) the loop steps are latency-bound whatever the tile, so more, smaller programs
    finish sooner; the per-sample matrices they request again are small next to idle SMs. At a
    batch that fills the GPU this returns the tile unchanged."""
    while block_n > floor and B * -(-N // block_n) < n_sm:
        block_n //= 2
    return block_n


# 16 warps per SM (a quarter of Hopper's 64) need at most 65,536 / (16 x 32) = 128 registers a thread.
OCCUPANCY_REGISTERS = 128


def token_splits(N: int, block_n: int, B: int, chunks: int, n_sm: int) -> int:
    """How many programs share a sample's tokens in a column kernel (grid: chunks x splits x B):
    as many as keep B x chunks x splits within four programs per SM, at most one per token tile,
    at least one (a batch that fills the GPU: one split, whose partial is the gradient itself)."""
    return max(1, min(-(-N // block_n), (4 * n_sm) // (B * chunks)))
