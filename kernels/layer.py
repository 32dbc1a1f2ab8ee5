"""Fused NEARL layer (SPEC 3.1): launchers, autograd Function and the public op.

The (B, N, d)-sized work (OCA, the projection, the residual, LN(x_out) and the query attention
over the tokens) runs in the Triton kernels of `layer_kernels.py` (forward: one kernel, two
passes over each tile of x) and `layer_bwd_kernels.py` (backward: a rows and a columns kernel).
What is per-sample and M-sized in one dimension (the OCA factors A and C, the absorbed keys, the
queries' LayerNorm and heads, the output projection and the MLP) stays in plain torch, formed by
`nearl.ops.fused_layer`, and autograd differentiates it.

This module is the kernels' side of that seam: launch configurations, launchers, the autograd
Function and custom ops over the token part (`layer_tokens`), and the layouts its operands take
(`block_queries`, `absorbed_keys`, `head_diagonal`, `small_products`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable
import triton

from . import layer_bwd_kernels as KB
from . import layer_kernels as K
from . import policy, runtime
from .policy import MAX_D, MAX_M, ORTH_CODES
from .runtime import interpreting

# The fused kernels hold the (H*M x D) query accumulator and (BLOCK_N x H*M) score tiles in
# registers; past 64 x 128 they spill whatever the tiles (ptxas, sm_80 and sm_90). Larger query
# banks take the split path: the fused OCA kernels, then the query update in torch.
MAX_FUSED_HM = 64
MAX_FUSED_D = 128
MAX_FUSED_M = 16


class SmallProducts(NamedTuple):
    """Per-sample terms the kernels' algebra needs besides the tokens' products, formed without
    gradient (`small_products`, or from the weights: `nearl.ops.fused_layer.layer_operands`)."""
    cc_kabs: torch.Tensor     # Cc KABS (B, M, HM)
    cc_wv: torch.Tensor       # Cc W_v (B, M, D)
    cc_cc: torch.Tensor       # Cc Cc^T (B, M, M)
    a_colsum: torch.Tensor    # 1^T A (B, M)
    kabs_colsum: torch.Tensor  # 1^T KABS (B, HM)
    wv_colsum: torch.Tensor   # 1^T W_v (D,)


class LayerOperands(NamedTuple):
    """Everything the fused kernels take besides x and the mask; the gradients are of the first six."""
    a: torch.Tensor       # A (B, d, M): OCA's scores are LN(x) A
    cc: torch.Tensor      # C's centred rows (B, M, d): C = cc + cbar 1^T
    cbar: torch.Tensor    # ... and their means (B, M)
    gate: torch.Tensor    # () the OCA gate
    kabs: torch.Tensor    # the absorbed keys (B, d, HM), a strided view (`absorbed_keys`)
    w_v: torch.Tensor     # the value weight (d, D)
    aux: SmallProducts


class LayerSaved(NamedTuple):
    """What the forward keeps for the backward besides its inputs (float32)."""
    u_all: torch.Tensor   # the query attention (B, HM, D), every head's columns (`head_diagonal`)
    lse: torch.Tensor     # its log-sum-exp (B, HM)
    prods: torch.Tensor   # the tokens' products (B, N, 2 M + HM + D) (`layer_kernels._save_products`)
    stats: torch.Tensor   # row terms (B, N_STATS, N)


class LayerGrads(NamedTuple):
    """Gradients of x and of `LayerOperands`' first six, each in its input's dtype."""
    dx: torch.Tensor
    da: torch.Tensor
    dcc: torch.Tensor
    dcbar: torch.Tensor
    dgate: torch.Tensor
    dkabs: torch.Tensor
    dw_v: torch.Tensor


def fused_supported(hm: int, D: int, dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None,
                    M: int = 16) -> bool:
    """True when the fused layer kernels take H*M = `hm` query rows (M per head) of width `D` in
    x's `dtype` on `device` (its tiling) without spilling: H*M <= 64, D <= 128 and M <= 16 (the
    backward's rows kernel spills hundreds of bytes at BLOCK_M = 64 on sm_90). On sm_80 (no
    warpgroup MMA: every warp holds its own copy of a product's second operand) IEEE float32
    products (float16 x, and float32 at "highest" precision: `policy.fp32_accurate_products`) spill in the forward
    whatever the tiles."""
    if hm > MAX_FUSED_HM or D > MAX_FUSED_D or M > MAX_FUSED_M:
        return False
    if device is not None and policy.fp32_accurate_products(dtype):
        gpu_tiles, _, cc = runtime.tiling(device)
        if gpu_tiles and cc < 90:
            return False
    return True


@dataclass(frozen=True)
class LayerConfig:
    block_n: int          # tokens per program, `layer_fwd_kernel`
    block_c: int          # ... and its column chunk
    attn_block_n: int     # tokens per loop step, `layer_attn_kernel`
    block_m: int
    block_hm: int
    block_d: int
    splits: int           # attention programs per sample: the partial states are (B, splits, ...)
    tiles_per_split: int
    num_warps: int
    num_stages: int
    precision: str
    attn_warps: int = 8   # `layer_attn_kernel`
    attn_max_registers: int = runtime.MAX_REGISTERS
    attn_stages: int = 1


def layer_config(B: int, N: int, d: int, M: int, HM: int, D: int, dtype: torch.dtype,
                 device: torch.device, orth: str = "hard") -> LayerConfig:
    """Launch parameters of the layer's two forward kernels, chosen in one place (the backward's:
    `layer_bwd_config`).

    - tl.dot needs every tile dimension >= 16 on the GPU, so M, H*M and D are padded to a power of
      two >= 16 and masked.
    - Registers decide the rest (measured with ptxas through tests/kernel_compile_check.py, sm_80
      and sm_90, triton 3.6 and 3.8), with 8 warps and one pipeline stage; H*M <= 64 and D <= 128
      (`fused_supported`: larger query banks take the split path).
      `layer_fwd_kernel` keeps the four product accumulators (BLOCK_N x (M + M + H*M + D)) live
      across its column loop, then stores them; the attention state lives in the other kernel.
      The token tile is what matters: every tile requests A, Cc (twice), KABS and W_v again. With
      16-column chunks: 128 tokens for bfloat16 x on sm_90 (214-220 registers, triton 3.6 and
      3.8; 64 with orth="soft", whose cos^2 spilled 32 bytes at 128 with triton 3.6, and with M
      not a multiple of 16, whose masked loads of A spilled 40 bytes at 128 with 3.6), 64 on
      sm_80 (206-210), 64 with IEEE float32 products on sm_90 (float32 and float16 x; no tensor
      cores: operands in registers; 192-224), which on sm_80 spill whatever the tiles and take
      the split path (`fused_supported`). When this kernel also held the attention
      state it took 32 tokens on sm_90 and 16 on sm_80. On the GPU, H*M and D are padded to 64
      and 128 whatever the query bank.
      `layer_attn_kernel` holds the (H*M x D) attention state and a tile of the kept products
      (BLOCK_N x (H*M + D)): 32 tokens (181-200 registers); it requests no per-tile matrix, so
      its tile size moves no bytes.
      16 warps would cap registers at 128 (the register file is 64K per SM): the compile check
      rejects any launch whose registers x threads exceed it.
    - Headroom: every configuration compiles without a spill with ptxas capped at 224 of the 255
      registers it may use (REG_BUDGET in the compile check): triton 3.8 tipped a configuration
      that fitted at 255 under 3.6 into an 8-byte spill, so fitting with nothing to spare is
      treated as a failure.
    - Splits (attention kernel): enough programs to fill the GPU once, and never more than the
      tiles of a sample (each split adds a partial attention state to combine). The products
      kernel has one program per tile.
    - The interpreter runs programs one at a time in numpy, so there the largest tiles win; at
      most two splits, which still exercises the combine.
    - Precision: `policy.fp32_accurate_products`; float32 accuracy is had here with IEEE products
      (the OCA kernels' three-TF32 split would hold three times the operands in registers).
    """
    block_m = max(16, triton.next_power_of_2(M))
    block_hm = max(16, triton.next_power_of_2(HM))
    block_d = max(16, triton.next_power_of_2(D))
    precision = "ieee" if policy.fp32_accurate_products(dtype) else "tf32"
    gpu_tiles, n_sm, cc = runtime.tiling(device)
    if gpu_tiles:  # every query bank takes the tile shape measured spill-free, H*M 64 x D 128 (masked)
        block_hm, block_d = MAX_FUSED_HM, MAX_FUSED_D
    if not gpu_tiles:
        block_n = attn_bn = min(128, max(16, triton.next_power_of_2(N)))
        block_c = min(256, max(16, triton.next_power_of_2(d)))
        n_tiles = triton.cdiv(N, attn_bn)
        splits = min(2, n_tiles)
    else:
        ieee = precision == "ieee"  # no tensor cores: the products' operands stay in registers
        if ieee:  # sm_90 only (fused_supported)
            block_n, block_c = 64, 16
        elif cc >= 90:  # TF32: bfloat16 x, or float32 x below "highest" matmul precision
            block_n, block_c = (128 if orth != "soft" and M % 16 == 0 else 64), 16
        else:  # sm_80 (64 x 32 fits at exactly 224 registers: no headroom)
            block_n, block_c = 64, 16
        block_n = policy.tokens_to_fill(block_n, B, N, n_sm)
        attn_bn = 32
        n_tiles = triton.cdiv(N, attn_bn)
        splits = max(1, min(n_tiles, triton.cdiv(n_sm, B)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    # The attention kernel on sm_90 with TF32 products: one 16-warp CTA at <= 128 registers a thread,
    # pipelined (115 at ViT-B/16; 106 capped at 112, no spill): 16 warps per SM where 8 warps at
    # 174 registers held 8. Elsewhere 8 warps and one stage: pipelined, it spilled 4-36 bytes
    # (IEEE products on sm_90, sm_80; triton 3.6). The products kernel's four accumulators
    # (BLOCK_N x (2 M + H*M + D)) keep it at 8 warps: at 16 it spilled 44 bytes capped at 112.
    wide = gpu_tiles and cc >= 90 and precision == "tf32"
    return LayerConfig(block_n, block_c, attn_bn, block_m, block_hm, block_d, splits, tiles_per_split,
                       num_warps=8, num_stages=policy.PIPELINE_STAGES if gpu_tiles else 1, precision=precision,
                       attn_warps=16 if wide else 8,
                       attn_max_registers=policy.OCCUPANCY_REGISTERS if wide else runtime.MAX_REGISTERS,
                       attn_stages=policy.PIPELINE_STAGES if wide else 1)


def fused_takes_width(d: int) -> bool:
    """True when the fused layer kernels take token width `d`: a multiple of 16 up to MAX_D. The split
    path's OCA kernels take any d up to MAX_D (a ConvNeXt's, a ModifiedResNet's last stage)."""
    return d % 16 == 0 and d <= MAX_D


def width_error(x: torch.Tensor) -> str:
    return f"x: the fused layer needs d a multiple of 16 up to {MAX_D}, got x of shape {tuple(x.shape)}"


def check_kernel_limits(x: torch.Tensor, q: torch.Tensor) -> None:
    """ValueError naming the argument when x (B, N, d) or q (.., M, D) is past every kernel's limits
    (a d the fused layer does not take goes through the split path: `fused_takes_width`)."""
    d, M = x.shape[2], q.shape[-2]
    if d > MAX_D:
        raise ValueError(width_error(x))
    if M > MAX_M:
        raise ValueError(f"q: the fused layer supports at most {MAX_M} queries, got M={M} (q of shape {tuple(q.shape)})")


def _mask_arg(mask, x):
    if mask is None:
        return x, False  # any pointer; HAS_MASK=False never reads it
    # the bool mask's own bytes read as int8 (a view: no conversion op on the hot path)
    return mask.contiguous().view(torch.int8), True


def layer_fwd(x: torch.Tensor, ops: LayerOperands, mask: Optional[torch.Tensor], orth: str
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], LayerSaved]:
    """(x_out (B, N, d) in x's dtype, cos2 (B, N) float32 or None, what the backward keeps):
    `LayerSaved`'s combined query attention U_all and its log-sum-exp, and the tokens' products
    and row terms. kabs and w_v may be strided views."""
    a, cc, cbar, gate, kabs, w_v, aux = ops
    B, N, d = x.shape
    M, HM, D = a.shape[2], kabs.shape[2], w_v.shape[1]
    cfg = layer_config(B, N, d, M, HM, D, x.dtype, x.device, orth)
    f32 = dict(device=x.device, dtype=torch.float32)
    ck, cv, gc, cola, ksum, vsum = (t.contiguous() for t in aux)
    out = runtime.empty((B, N, d), device=x.device, dtype=x.dtype)
    cos2 = runtime.empty((B, N), **f32) if orth == "soft" else out
    prods = runtime.empty((B, N, 2 * M + HM + D), **f32)
    stats = runtime.empty((B, K.N_STATS.value, N), **f32)
    p_s = runtime.empty((B, N, M), **f32)  # OCA's P, for the attention kernel
    runtime.launch(K.layer_fwd_kernel, (triton.cdiv(N, cfg.block_n), B),
        x, *x.stride(), a, *a.stride(), cc, *cc.stride(),
        cbar.contiguous(), gate, kabs, *kabs.stride(), w_v, *w_v.stride(), gc, cola,
        out, cos2, prods, stats, p_s,
        N, d, M, HM, D, policy.LN_EPS, policy.ORTH_EPS, policy.COS2_EPS,
        ORTH=ORTH_CODES[orth], BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m,
        BLOCK_HM=cfg.block_hm, BLOCK_D=cfg.block_d, PREC=cfg.precision, ROUND_BY_HAND=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    m_part = runtime.empty((B, cfg.splits, HM), **f32)
    l_part = runtime.empty((B, cfg.splits, HM), **f32) if cfg.splits > 1 else m_part  # FINAL never writes it
    acc_part = runtime.empty((B, cfg.splits, HM, D), **f32)
    mask_arg, has_mask = _mask_arg(mask, x)
    runtime.launch(K.layer_attn_kernel, (cfg.splits, B),
        prods, stats, p_s, gate, ck, cv, ksum, vsum, mask_arg, m_part, l_part, acc_part,
        N, d, M, HM, D, cfg.tiles_per_split, cfg.splits,
        HAS_MASK=has_mask, FINAL=cfg.splits == 1, BLOCK_N=cfg.attn_block_n, BLOCK_M=cfg.block_m,
        BLOCK_HM=cfg.block_hm, BLOCK_D=cfg.block_d, PREC=cfg.precision, num_warps=cfg.attn_warps,
        num_stages=cfg.attn_stages, maxnreg=cfg.attn_max_registers,
    )
    cos2 = cos2 if orth == "soft" else None
    if cfg.splits == 1:  # nothing to combine: the kernel wrote U_all and the log-sum-exp (FINAL)
        return out, cos2, LayerSaved(acc_part[:, 0], m_part[:, 0], prods, stats)
    # Combine the splits' softmax states (deterministic: a torch sum over a fixed axis).
    m_max = m_part.max(dim=1).values
    w = torch.exp(m_part - m_max[:, None])
    l_tot = (w * l_part).sum(dim=1)
    u_all = (w[..., None] * acc_part).sum(dim=1) / l_tot[..., None]
    lse = m_max + torch.log(l_tot)
    return out, cos2, LayerSaved(u_all, lse, prods, stats)


@dataclass(frozen=True)
class LayerBwdConfig:
    dout_block_n: int     # tokens per program, dout kernel
    dout_block_c: int     # ... and its column chunk
    rows_block_n: int     # tokens per program, rows kernel
    cols_block_n: int     # columns kernel: tokens per loop step
    cols_block_d: int     # ... and columns per program
    splits: int           # token splits per sample: the partials are (B, splits, ...)
    block_m: int
    block_hm: int
    num_warps: int
    precision: str
    num_stages: int = 1       # dout and rows kernels
    cols_num_stages: int = 1  # columns kernel


def layer_bwd_config(B: int, N: int, d: int, M: int, HM: int, dtype: torch.dtype,
                     device: torch.device, orth: str = "hard") -> LayerBwdConfig:
    """Launch parameters of the three backward kernels, chosen in one place.

    - M and H*M padded to powers of two >= 16 (tl.dot), masked.
    - Dout kernel: one accumulator (BLOCK_N x M) and the column chunks of dout and x: 128 tokens
      with 32-column chunks, 64 x 16 with IEEE float32 products (64-96 registers). It is the one
      that requests Cc^T per tile, so its tiles are large.
    - Rows kernel: its epilogue holds a dozen (BLOCK_N x M or H*M) row terms: 16 tokens at 8
      warps, about 223 registers on sm_90 (32 tokens spill 200-380 bytes). It requests no
      per-tile matrix, so its tile size moves no bytes.
    - Columns kernel: every column program re-reads its tokens' float32 scratch (2 M + 2 H*M +
      13 values a token), so the widest chunk that fits is what cuts the backward's traffic. It
      holds (BLOCK_DC x (2 M + 2 H*M)) float32 accumulators across its token loop, plus
      (BLOCK_N x BLOCK_DC) tiles of x, dout, LN(x_out), G, Delta and dx; the chunks of A^T, Cc,
      KABS^T and DO are the right operands of its products, which sm_90's warpgroup MMA reads
      from shared memory, not registers. 16 tokens at 8 warps: 64 columns on sm_90 with bf16 x
      (its 16-bit A, KABS and DO and bf16 scratch: 196-232 registers with 3 stages; 128 columns
      spilled 8-116 bytes, and with float32 operands took 254 registers at 1 stage), 32 on sm_80
      (mma.sync: operands in registers; 64 spill 450-550 bytes) and 16 with IEEE products (32
      spilled 4-16 bytes: orth="soft" on both toolchains, "hard" on triton 3.6).
    - Splits: a sample's tokens go to several programs only when B * (d chunks) is under half
      the target of four programs per SM (as many splits as stay within it), so at large B the
      partials are (B, 1, ...).
    - Interpreter: the largest tiles (programs run one at a time); at most two splits, which
      still exercises the sum of partials.
    Registers measured with tests/kernel_compile_check.py (sm_80, sm_90; triton 3.6, 3.8), with
    the headroom rule of `layer_config`.
    """
    block_m = max(16, triton.next_power_of_2(M))
    precision = "ieee" if policy.fp32_accurate_products(dtype) else "tf32"
    gpu_tiles, n_sm, cc = runtime.tiling(device)
    # On the GPU every query bank takes H*M padded to 64 (masked): the tiles below were measured
    # spill-free at 64, and triton 3.6 spilled 16 bytes at 32 with the same tiles.
    block_hm = max(16, triton.next_power_of_2(HM)) if not gpu_tiles else max(64, triton.next_power_of_2(HM))
    if not gpu_tiles:
        rows_bn = cols_bn = dout_bn = min(128, max(16, triton.next_power_of_2(N)))
        dout_bc = cols_bd = min(256, max(16, triton.next_power_of_2(d)))
        splits = min(2, triton.cdiv(N, cols_bn))
    else:
        ieee = precision == "ieee"
        dout_bn, dout_bc = (64, 16) if ieee else (128, 32)
        dout_bn = policy.tokens_to_fill(dout_bn, B, N, n_sm)
        rows_bn = 16
        cols_bn = 16
        if ieee:  # sm_90 only (fused_supported)
            cols_bd = 16
        elif cc < 90:
            cols_bd = 32
        else:  # TF32: bf16 x (16-bit A, KABS and DO spilled 8-116 bytes at 128), or float32 below "highest"
            cols_bd = 64
        cols_bd = min(cols_bd, max(16, triton.next_power_of_2(d)))
        chunks = triton.cdiv(d, cols_bd)
        splits = policy.token_splits(N, cols_bn, B, chunks, n_sm)
    # Pipelined loops (policy.PIPELINE_STAGES). The columns kernel's only with 16-bit operands on
    # sm_90 (64 columns: 210 registers with 3 stages): at 224 registers its 128-column float32
    # tiles spilled 148 bytes with 2 stages and 204 with 3 (sm_90, triton 3.8).
    stages = policy.PIPELINE_STAGES if gpu_tiles else 1
    cols_stages = stages if gpu_tiles and cc >= 90 and policy.operand_dtype(dtype) == torch.bfloat16 else 1
    return LayerBwdConfig(dout_bn, dout_bc, rows_bn, cols_bn, cols_bd, splits, block_m, block_hm, 8, precision,
                          num_stages=stages, cols_num_stages=cols_stages)


def _query_side_terms(du_all, w_v, cv, vsum, u_all, prods, M: int):
    """The backward's small per-sample terms, from torch: DO = dU_all W_v^T (B, HM, d) in W_v's
    dtype (policy.operand_dtype), Cc DO^T (B, M, HM), DO 1 (B, HM), rowsum(dU_all * U_all) (B, HM)
    and (x - s) DO^T (B, N, HM)."""
    B, HM, D = du_all.shape
    do = (du_all.to(w_v.dtype) @ w_v.t()).contiguous()
    cdo = (cv @ du_all.transpose(1, 2)).contiguous()
    dosum = (du_all @ vsum).contiguous()
    # rowsum(dU * U) of flash-attention's backward, as B*HM dot products: one read of each (a
    # multiply then a sum would write and re-read their product)
    qdelta = torch.bmm(du_all.reshape(B * HM, 1, D), u_all.reshape(B * HM, D, 1)).view(B, HM)
    # (x - s) DO^T = ((x - s) W_v) dU_all^T from the forward's (x - s) W_v: one batched product
    # where the rows kernel would re-read DO (HM x d) for every tile
    xdo = torch.bmm(prods[..., 2 * M + HM:], du_all.transpose(1, 2))
    return do, cdo, dosum, qdelta, xdo


def layer_bwd(x: torch.Tensor, ops: LayerOperands, mask: Optional[torch.Tensor], orth: str, saved: LayerSaved, *,
              dout: Optional[torch.Tensor], dcos2: Optional[torch.Tensor], du_all: Optional[torch.Tensor]
              ) -> LayerGrads:
    """Gradients of x and of the operands, given those of x_out (dout), cos2 (dcos2, orth="soft")
    and U_all (du_all); None for a gradient nobody sent.

    Three kernels (`kernels/layer_bwd_kernels.py`): the dout kernel makes the one pass over dout
    (and x, hard projection), dout Cc^T and two row sums; the rows kernel reduces every row-level
    quantity from those and the forward's products (prods, stats: `layer_fwd`) and writes P and
    rstd dS (B, N, M), dS_q and Pq (B, N, H*M) in `policy.scratch_dtype` (bf16 for bf16 x, the
    operands of the columns kernel's products), 13 row scalars (B, 13, N) float32 and a dgate
    partial per tile; the columns kernel writes
    dx and float32 partials of dA^T, dC (B, S, M, d), dKABS^T and (LN(x_out)^T Pq)^T
    (B, S, H*M, d), and dC's row sums per program (B, S, d chunks, M), summed here with torch
    (deterministic: no atomics). dW_v = sum_b
    (LN(x_out)^T Pq)[b] dU_all[b]. Small per-sample terms come from torch (`_query_side_terms`).
    """
    a, cc, cbar, gate, kabs, w_v, aux = ops
    u_all, lse, prods, stats = saved
    B, N, d = x.shape
    M, HM = a.shape[2], kabs.shape[2]
    D = w_v.shape[1]
    cfg = layer_bwd_config(B, N, d, M, HM, x.dtype, x.device, orth)
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    ck, cv, gc, cola, ksum, vsum = (t.contiguous() for t in aux)
    du_all = torch.zeros_like(u_all) if du_all is None else du_all.float().contiguous()
    dout = torch.zeros((1, 1, 1), dtype=x.dtype, device=dev).expand(B, N, d) if dout is None else dout
    if orth != "soft" or dcos2 is None:  # no upstream cos^2 gradient: read a zero, stride 0
        dcos2 = torch.zeros((1, 1), **f32).expand(B, N)
    do, cdo, dosum, qdelta, xdo = _query_side_terms(du_all, w_v, cv, vsum, u_all, prods, M)
    mask_arg, has_mask = _mask_arg(mask, x)
    n_rows_tiles = triton.cdiv(N, cfg.rows_block_n)
    dg_part = runtime.empty((B, n_rows_tiles), **f32)
    scratch = dict(device=dev, dtype=policy.scratch_dtype(x.dtype))
    p_s = runtime.empty((B, N, M), **scratch)
    ds_s = runtime.empty((B, N, M), **scratch)
    dsq_s = runtime.empty((B, N, HM), **scratch)
    pq_s = runtime.empty((B, N, HM), **scratch)
    rows = runtime.empty((B, KB.N_ROWS.value, N), **f32)
    orth_code = ORTH_CODES[orth]
    dterms = runtime.empty((B, N, M + 2), **f32)
    runtime.launch(KB.layer_bwd_dout_kernel, (triton.cdiv(N, cfg.dout_block_n), B),
        x, *x.stride(), dout, *dout.stride(), cc, *cc.stride(), dterms, N, d, M,
        ORTH=orth_code, BLOCK_N=cfg.dout_block_n, BLOCK_C=cfg.dout_block_c, BLOCK_M=cfg.block_m,
        PREC=cfg.precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    runtime.launch(KB.layer_bwd_rows_kernel, (n_rows_tiles, B),
        dterms, prods, stats, xdo,
        cbar.contiguous(), gate, lse.contiguous(), qdelta, dcos2, *dcos2.stride(), mask_arg,
        ck, cdo, gc, cola, ksum, dosum,
        p_s, ds_s, dsq_s, pq_s, rows, dg_part,
        N, d, M, HM, D, policy.LN_EPS, policy.ORTH_EPS, policy.COS2_EPS,
        ORTH=orth_code, HAS_MASK=has_mask, BLOCK_N=cfg.rows_block_n,
        BLOCK_M=cfg.block_m, BLOCK_HM=cfg.block_hm, PREC=cfg.precision, ROUND_BY_HAND=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    S = cfg.splits
    dx = runtime.empty((B, N, d), dtype=x.dtype, device=dev)
    # all (.., M or HM, d): see the kernel's stores. With one split a program's partial is the
    # gradient itself: stored in its input's dtype (16-bit A and KABS: SPEC 7), no cast after.
    grad_dtype = (lambda t: t.dtype) if S == 1 else (lambda t: torch.float32)
    da_part = runtime.empty((B, S, M, d), device=dev, dtype=grad_dtype(a))
    dc_part = runtime.empty((B, S, M, d), **f32)
    n_chunks = triton.cdiv(d, cfg.cols_block_d)
    dcb_part = runtime.empty((B, S, n_chunks, M), **f32)  # row sums of dC per program: cbar's gradient
    dk_part = runtime.empty((B, S, HM, d), device=dev, dtype=grad_dtype(kabs))
    ob_part = runtime.empty((B, S, HM, d), **f32)
    runtime.launch(KB.layer_bwd_cols_kernel, (n_chunks, S, B),
        x, *x.stride(), dout, *dout.stride(), a, *a.stride(), cc, *cc.stride(), kabs, *kabs.stride(),
        do, gate, p_s, ds_s, dsq_s, pq_s, rows,
        dx, da_part, dc_part, dk_part, ob_part, dcb_part,
        N, d, M, HM, triton.cdiv(N, cfg.cols_block_n),
        ORTH=orth_code, BLOCK_N=cfg.cols_block_n, BLOCK_DC=cfg.cols_block_d, BLOCK_M=cfg.block_m,
        BLOCK_HM=cfg.block_hm, PREC=cfg.precision, ROUND_BY_HAND=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.cols_num_stages)
    first_or_sum = (lambda t: t[:, 0]) if S == 1 else (lambda t: t.sum(1))
    da_t, dc, dkabs_t, obar_t = (first_or_sum(t) for t in (da_part, dc_part, dk_part, ob_part))
    dw_v = obar_t.reshape(B * HM, d).t() @ du_all.reshape(B * HM, D)  # sum_b (LN(x_out)^T Pq)[b] dU_all[b]
    dgate = dg_part.sum()
    return LayerGrads(dx, da_t.transpose(1, 2).to(a.dtype), dc.to(cc.dtype), dcb_part.sum((1, 2)).to(cbar.dtype),
                      dgate.to(gate.dtype).reshape(gate.shape), dkabs_t.transpose(1, 2).to(kabs.dtype),
                      dw_v.to(w_v.dtype))


# The token part of the layer as torch custom ops, so torch.compile traces through the kernels
# without a graph break; register_autograd ties the two together. Eager calls take the
# autograd.Function below; both run the same launchers and layer_tokens_backward.
@torch.library.custom_op("nearl::layer_tokens_fwd", mutates_args=())
def layer_tokens_fwd(x: torch.Tensor, a: torch.Tensor, cc: torch.Tensor, cbar: torch.Tensor, gate: torch.Tensor,
                     kabs: torch.Tensor, w_v: torch.Tensor, aux: List[torch.Tensor],
                     mask: Optional[torch.Tensor], orth: str
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, cos2, saved = layer_fwd(x, _operands(a, cc, cbar, gate, kabs, w_v, aux), mask, orth)
    if cos2 is None:  # fixed arity: an empty placeholder unless orth="soft"
        cos2 = x.new_empty((0,), dtype=torch.float32)
    return (out, cos2, *saved)


def _operands(a, cc, cbar, gate, kabs, w_v, aux) -> LayerOperands:
    """The named operands from the flat arguments a torch custom op takes."""
    return LayerOperands(a, cc, cbar, gate, kabs, w_v, SmallProducts(*aux))


@layer_tokens_fwd.register_fake
def _(x, a, cc, cbar, gate, kabs, w_v, aux, mask, orth):
    B, N, _ = x.shape
    M, HM, D = a.shape[2], kabs.shape[2], w_v.shape[1]
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((B, N) if orth == "soft" else (0,), **f32),
            x.new_empty((B, HM, D), **f32), x.new_empty((B, HM), **f32),
            x.new_empty((B, N, 2 * M + HM + D), **f32), x.new_empty((B, K.N_STATS.value, N), **f32))


def layer_tokens_backward(dout, dcos2, du_all, x, a, cc, cbar, gate, kabs, w_v, aux, mask, u_all, lse, prods, stats,
                          orth):
    """Gradients of (x, a, cc, cbar, gate, kabs, w_v), from the custom ops' flat arguments: `layer_bwd`."""
    return tuple(layer_bwd(x, _operands(a, cc, cbar, gate, kabs, w_v, aux), mask, orth,
                           LayerSaved(u_all, lse, prods, stats),
                           dout=dout, dcos2=dcos2 if orth == "soft" else None, du_all=du_all))


@torch.library.custom_op("nearl::layer_tokens_bwd", mutates_args=())
def layer_tokens_bwd(dout: Optional[torch.Tensor], dcos2: Optional[torch.Tensor], du_all: Optional[torch.Tensor],
                     x: torch.Tensor, a: torch.Tensor, cc: torch.Tensor, cbar: torch.Tensor, gate: torch.Tensor,
                     kabs: torch.Tensor, w_v: torch.Tensor, aux: List[torch.Tensor], mask: Optional[torch.Tensor],
                     u_all: torch.Tensor, lse: torch.Tensor, prods: torch.Tensor, stats: torch.Tensor, orth: str
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    return layer_tokens_backward(dout, dcos2, du_all, x, a, cc, cbar, gate, kabs, w_v, aux, mask, u_all, lse, prods,
                                 stats, orth)


@layer_tokens_bwd.register_fake
def _(dout, dcos2, du_all, x, a, cc, cbar, gate, kabs, w_v, aux, mask, u_all, lse, prods, stats, orth):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (x, a, cc, cbar, gate, kabs, w_v))


def _setup_context(ctx, inputs, output):
    x, a, cc, cbar, gate, kabs, w_v, aux, mask, orth = inputs
    _, _, u_all, lse, prods, stats = output
    ctx.n_aux = len(aux)
    ctx.save_for_backward(x, a, cc, cbar, gate, kabs, w_v, mask, u_all, lse, prods, stats, *aux)
    ctx.orth = orth


def _unpack(ctx):
    """The saved tensors in `layer_tokens_backward`'s order: (x, ..., w_v, aux, mask, u_all, lse,
    prods, stats)."""
    x, a, cc, cbar, gate, kabs, w_v, mask, u_all, lse, prods, stats, *aux = ctx.saved_tensors
    return x, a, cc, cbar, gate, kabs, w_v, list(aux), mask, u_all, lse, prods, stats


def _backward(ctx, dout, dcos2, du_all, _dlse, _dprods, _dstats):
    grads = layer_tokens_bwd(dout, dcos2, du_all, *_unpack(ctx), ctx.orth)
    return (*grads, [None] * ctx.n_aux, None, None)  # aux: detached helpers (see layer_operands); mask; orth


layer_tokens_fwd.register_autograd(_backward, setup_context=_setup_context)


class _LayerTokensFunction(torch.autograd.Function):
    """The eager path: the same launchers without the custom-op dispatch cost (as kernels/oca.py)."""

    @staticmethod
    def forward(ctx, x, a, cc, cbar, gate, kabs, w_v, aux, mask, orth):
        out, cos2, (u_all, lse, prods, stats) = layer_fwd(x, _operands(a, cc, cbar, gate, kabs, w_v, aux), mask, orth)
        ctx.save_for_backward(x, a, cc, cbar, gate, kabs, w_v, mask, u_all, lse, prods, stats, *aux)
        ctx.orth = orth
        ctx.mark_non_differentiable(lse, prods, stats)
        ctx.set_materialize_grads(False)  # no (B, N, ...) zeros for the outputs nobody differentiates
        cos2 = x.new_empty((0,), dtype=torch.float32) if cos2 is None else cos2
        return out, cos2, u_all, lse, prods, stats

    @staticmethod
    @once_differentiable  # double backward raises (docs/python.md, "Double backward")
    def backward(ctx, dout, dcos2, du_all, _dlse, _dprods, _dstats):
        return (*layer_tokens_backward(dout, dcos2, du_all, *_unpack(ctx), ctx.orth), None, None, None)


# Which path `layer_tokens` takes; a name of this module, so a test can force the custom-op path
# without patching torch.compiler itself (dynamo special-cases that function by identity).
compiling = torch.compiler.is_compiling


def layer_tokens(x: torch.Tensor, ops: LayerOperands, mask: Optional[torch.Tensor], orth: str):
    """(x_out, cos2, U_all, lse): the custom op when torch.compile traces (opaque to dynamo, with
    fake and autograd rules), the autograd.Function in eager mode. aux gets no gradient: the
    backward differentiates through a, cc, kabs and w_v directly. The products both return for
    the backward stay with autograd."""
    a, cc, cbar, gate, kabs, w_v, aux = ops
    aux = list(aux)
    if compiling():
        return layer_tokens_fwd(x, a, cc, cbar, gate, kabs, w_v, aux, mask, orth)[:4]
    return _LayerTokensFunction.apply(x, a, cc, cbar, gate, kabs, w_v, aux, mask, orth)[:4]


class _BlockQueries(torch.autograd.Function):
    """`block_queries` with the backward that reads only the diagonal blocks of the (B, H*M, D)
    gradient: autograd's own, for the masked product, multiplies the whole gradient by the mask
    and then sums it over the heads (twice the gradient's size in traffic, four times Qh's)."""

    @staticmethod
    def forward(ctx, qh, heads):
        B, M, D = qh.shape
        dh = D // heads
        ctx.heads = heads
        heads_eye = torch.eye(heads, dtype=qh.dtype, device=qh.device) / math.sqrt(dh)
        return (qh.view(B, 1, M, heads, dh) * heads_eye.view(1, heads, 1, heads, 1)).reshape(B, heads * M, D)

    @staticmethod
    @once_differentiable  # double backward raises (docs/python.md, "Double backward")
    def backward(ctx, grad):
        B, HM, D = grad.shape
        heads = ctx.heads
        M, dh = HM // heads, D // heads
        dqh = grad.new_empty(B, M, heads, dh)  # one op reads the diagonal blocks and writes Qh's layout
        torch.div(_diagonal_blocks(grad.contiguous(), heads), math.sqrt(dh), out=dqh)
        return dqh.view(B, M, D), None


def block_queries(qh: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H*M, D) from Qh (B, M, D): row h*M + m keeps only head h's columns of Qh[m], scaled by
    1/sqrt(dh), so that K @ block_queries^T gives every head's scores in one product."""
    return _BlockQueries.apply(qh, heads)


def head_products(g: torch.Tensor, qh: torch.Tensor, heads: int) -> torch.Tensor:
    """sqrt(dh) g @ block_queries(qh, heads)^T (B, Mg, H*M) from g (B, Mg, D) and Qh (B, M, D),
    without forming the (B, H*M, D) block queries: per head, g's and Qh's head columns. Unscaled:
    callers fold 1/sqrt(dh) into a weight-sized factor of g (a batch-sized division is one more op)."""
    B, Mg, D = g.shape
    M, dh = qh.shape[1], D // heads
    gh = g.reshape(B, Mg, heads, dh).transpose(1, 2)  # (B, H, Mg, dh)
    qt = qh.reshape(B, M, heads, dh).permute(0, 2, 3, 1)  # (B, H, dh, M)
    return (gh @ qt).transpose(1, 2).reshape(B, Mg, heads * M)


def absorbed_keys(qb: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """KABS (B, d, H*M) from the block queries qb = `block_queries(Qh, H)`: column h*M + m is
    W_k[:, head h] @ Qh[m, head h] / sqrt(dh), so that LN(x_out) @ KABS gives every head's scores
    in one product. Returned as the transposed view of a contiguous (B, H*M, d) product: one
    matrix multiplication writes it, no copy (the kernels take strides)."""
    return (qb @ w_k.t()).transpose(1, 2)


def small_products(a: torch.Tensor, cc: torch.Tensor, kabs: torch.Tensor, w_v: torch.Tensor) -> SmallProducts:
    """`layer_fwd`'s aux, computed from the batch-sized factors (tests and tools; the layer forms
    them from weights, `layer_operands`): cc @ kabs (B, M, HM), cc @ w_v (B, M, D), cc @ cc^T
    (B, M, M) and the column sums of a (B, M), kabs (B, HM) and w_v (D)."""
    return SmallProducts(cc @ kabs, cc @ w_v, cc @ cc.transpose(1, 2), a.sum(1), kabs.sum(1), w_v.sum(0))


def _diagonal_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """A view (B, M, H, dh) of t (B, H*M, D): row (h, m), head h's columns."""
    B, HM, D = t.shape
    M, dh = HM // heads, D // heads
    return torch.diagonal(t.view(B, heads, M, heads, dh), dim1=1, dim2=3).permute(0, 1, 3, 2)


def head_diagonal(u_all: torch.Tensor, heads: int) -> torch.Tensor:
    """U (B, M, D) from U_all (B, H*M, D): row (h, m) keeps only head h's columns."""
    B, HM, D = u_all.shape
    return _diagonal_blocks(u_all, heads).reshape(B, HM // heads, D)
