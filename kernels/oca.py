"""Fused Triton kernels for the OCA step of SPEC 3.1 (`ops.oca`), forward and backward.

    out = x + gate * orth(softmax(LN(x) @ a[b]) @ c[b], x)

Layers, from the bottom up:

1. `@triton.jit` kernels. No kernel holds a whole row in registers: rows are streamed in
   BLOCK_DC-column chunks, so registers do not grow with d and any d (multiple of 16 or not) works.
   - `_oca_fwd_kernel`, grid (token tiles, B). A program owns BLOCK_N tokens of one sample and
     makes two passes over their columns: `_one_pass` sums the LayerNorm statistics and the
     products (x - s) @ A and (x - s) @ C^T of the row shifted by its first chunk's mean, from
     which S = LN(x) @ A = rstd ((x - s) A - (mean - s) 1^T A) and x @ C^T follow (tl.dot,
     accumulated over chunks; M padded to BLOCK_M >= 16, masked to -inf before the softmax); then
     Delta = P @ C, the projection (hard: <Delta, x> = rowsum(P * xC) is known before the pass;
     soft: |Delta|^2 accumulated in it) and out = x + gate * update, written chunk by chunk,
     backwards from the chunk the first pass ended on, so that every re-read comes as soon after
     the first read as it can (L1/L2). Requested: two reads of x, one write of out. With NORM
     (`oca_norm_fwd`, the split layer's start) the same pass also writes LN(out): its statistics
     follow from pass 1's sums and C C^T before out exists (`_out_stats`), which saves the
     LayerNorm's own read of out and its statistics pass.
   - `_oca_bwd_rows_kernel`, grid (token tiles, B): recomputes the forward's row quantities from
     x (saved tensors are the inputs only: no (B, N, M) or (B, N, d) intermediate is kept by the
     forward) in one pass (`_one_pass`, with dout), reduces every row-level backward quantity to M-sized products (see
     its docstring), and writes P and rstd*dS (B, N, M) fp32, eight row scalars (B, 8, N) and a
     dgate partial per tile.
   - `_oca_bwd_cols_kernel`, grid (d chunks, token splits, B): with those, dx is column-local:
     a program owns BLOCK_DC columns of one sample, loops over the token tiles of its split,
     writes dx and accumulates fp32 (BLOCK_DC x BLOCK_M) partials of dA = LN(x)^T dS and
     dC = P^T dDelta, stored once into its own slot of a (B, splits, ...) buffer that the launcher
     sums with torch (deterministic: no atomics anywhere).
   Why two backward kernels: the token reductions dA and dC need a (d x M) accumulator pair per
   program (2 x 768 x 16 fp32 for ViT-B/16) next to the row work; that does not fit in registers
   without spilling. The split costs one more read of x and dout (backward HBM traffic: x and
   dout read twice, dx written once, about 5 passes over (B, N, d) instead of the minimum 3) and
   a small (B, N, M) scratch.
2. Plain-Python launchers `oca_fwd` / `oca_norm_fwd` / `oca_bwd`; every block size, warp count and split count
   comes from `_oca_config`, the dot precision from `_precision`.
3. `_OcaFunction`, a thin `torch.autograd.Function`.
4. `oca(...)`, the public entry point. Under `torch.compile` it calls the torch custom ops
   `nearl::oca_fwd` / `nearl::oca_bwd` (`torch.library.custom_op` + `register_fake` +
   `register_autograd`, present since torch 2.4), so dynamo puts one opaque node in the graph
   instead of breaking it; in eager mode (GPU, or the CPU interpreter) it calls `_OcaFunction`
   directly, which skips the custom-op dispatch overhead.

All arithmetic is float32 whatever the input dtypes; tl.dot multiplies fp32 tiles in tf32 on the
GPU, three times on a hi/lo split ("tf32x3", about fp32 accuracy) unless x is bfloat16 (see
`_precision`). float64 inputs (gradcheck) are not run by the kernels: they go to the reference.
Only long-stable Triton APIs are used (tl.dot with input_precision "tf32", tl.trans, masked
tl.load/tl.store, bitcasts): the kernels target triton 3.6 to 3.8 (README, "Supported versions").
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from . import policy, runtime
from .casting import cast_out
from .policy import MAX_D, MAX_M, ORTH_CODES
from .tiles import (ORTH_HARD, ORTH_NONE, ORTH_SOFT, first_chunk_mean, last_chunk_start, load_tile,
                    shifted_row_stats)
from .runtime import interpreting

_LN_EPS = tl.constexpr(policy.LN_EPS)
_ORTH_EPS = tl.constexpr(policy.ORTH_EPS)
_COS2_EPS = tl.constexpr(policy.COS2_EPS)


# --------------------------------------------------------------------------------------------
# 1. kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_terms(x, shift, k0, b, offs_n, mask_n, D, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd,
                 DOUT, s_gb, s_gn, s_gd, offs_m, mask_m, s1, s2, xa, xc, oc, cola, csum, do_x, gram,
                 ORTH: tl.constexpr, WITH_DOUT: tl.constexpr, GRAM: tl.constexpr, BLOCK_DC: tl.constexpr,
                 PREC: tl.constexpr):
    """`_one_pass`'s sums and products, updated with the chunk x (BLOCK_N x BLOCK_DC) at column k0."""
    offs_d = k0 + tl.arange(0, BLOCK_DC)
    mask_d = offs_d < D
    xs = tl.where(mask_d[None, :], x - shift[:, None], 0.0)
    s1 += tl.sum(xs, axis=1)
    s2 += tl.sum(xs * xs, axis=1)
    a = load_tile(A + b * s_ab, s_ad, s_am, offs_d, offs_m, mask_d, mask_m)
    xa = _mm(xs, a, xa, PREC)
    cola += tl.sum(a, axis=0)
    if ORTH != ORTH_NONE or WITH_DOUT or GRAM:
        c = load_tile(C + b * s_cb, s_cm, s_cd, offs_m, offs_d, mask_m, mask_d)
        if ORTH != ORTH_NONE or GRAM:
            xc = _mm(xs, tl.trans(c), xc, PREC)
            csum += tl.sum(c, axis=1)
        if GRAM:
            gram = _mm(c, tl.trans(c), gram, PREC)
        if WITH_DOUT:
            do = load_tile(DOUT + b * s_gb, s_gn, s_gd, offs_n, offs_d, mask_n, mask_d)
            oc = _mm(do, tl.trans(c), oc, PREC)
            if ORTH == ORTH_HARD:
                do_x += tl.sum(do * x, axis=1)
    return s1, s2, xa, xc, oc, cola, csum, do_x, gram


@triton.jit
def _one_pass(X, b, offs_n, mask_n, D, s_xb, s_xn, s_xd, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd,
              DOUT, s_gb, s_gn, s_gd, offs_m, mask_m,
              ORTH: tl.constexpr, WITH_DOUT: tl.constexpr, GRAM: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DC: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Everything a token's OCA needs from its row, in one pass over the columns:
    (mean, rstd, <x, x>, S = LN(x) @ A, x @ C^T, and with WITH_DOUT dout @ C^T, <dout, x>, 1^T A),
    then what the statistics of out = alpha x + g Delta take (`_out_stats`): the shift s, the sums
    of (x - s) and its squares, (x - s) @ C^T, C 1 and, with GRAM, C C^T.

    The products use x minus its first chunk's mean (a shift within about a standard deviation
    of the row mean), and LN(x) A = rstd ((x - s) A - (mean - s) 1^T A): no pass for the statistics
    first, and no cancellation when a row's mean is large against its spread. The first chunk,
    which gives the shift, is peeled off the loop: every chunk is requested once."""
    offs_0 = tl.arange(0, BLOCK_DC)
    x0 = load_tile(X + b * s_xb, s_xn, s_xd, offs_n, offs_0, mask_n, offs_0 < D)
    shift = first_chunk_mean(x0, D, BLOCK_DC)
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    xa = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    xc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    oc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    cola = tl.zeros((BLOCK_M,), dtype=tl.float32)
    csum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    do_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gram = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    s1, s2, xa, xc, oc, cola, csum, do_x, gram = _chunk_terms(
        x0, shift, 0, b, offs_n, mask_n, D, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd, DOUT, s_gb, s_gn, s_gd,
        offs_m, mask_m, s1, s2, xa, xc, oc, cola, csum, do_x, gram, ORTH, WITH_DOUT, GRAM, BLOCK_DC, PREC)
    for k0 in range(BLOCK_DC, D, BLOCK_DC):
        x = load_tile(X + b * s_xb, s_xn, s_xd, offs_n, k0 + offs_0, mask_n, k0 + offs_0 < D)
        s1, s2, xa, xc, oc, cola, csum, do_x, gram = _chunk_terms(
            x, shift, k0, b, offs_n, mask_n, D, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd, DOUT, s_gb, s_gn, s_gd,
            offs_m, mask_m, s1, s2, xa, xc, oc, cola, csum, do_x, gram, ORTH, WITH_DOUT, GRAM, BLOCK_DC, PREC)
    mean, dm, _, rstd, xx = shifted_row_stats(s1, s2, shift, D, _LN_EPS)
    s = rstd[:, None] * (xa - dm[:, None] * cola[None, :])
    xcs = xc  # (x - s) C^T
    xc = xc + shift[:, None] * csum[None, :]  # x C^T
    return mean, rstd, xx, s, xc, oc, do_x, cola, shift, s1, s2, xcs, csum, gram


@triton.jit
def _softmax_rows(s, mask_m):
    s = tl.where(mask_m[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _tf32_hi(v):
    """v rounded to tf32's 10 mantissa bits (round half up on the magnitude, exact in tf32);
    v - _tf32_hi(v) is the rest, |rest| <= 2^-11 |v|, of either sign (so the dropped lo*lo terms
    do not pile up with one sign)."""
    return ((v.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for fp32 tiles. PREC "tf32x3": three tf32 products on a hi/lo split done here,
    in the tiles' own layout (Triton's built-in "tf32x3" splits inside the dot-operand layout,
    which spilled registers in these kernels); the dropped lo*lo term is <= 2^-22 relative."""
    if PREC == "tf32x3":
        a_hi = _tf32_hi(a)
        b_hi = _tf32_hi(b)
        acc = tl.dot(a - a_hi, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _out_stats(p, alpha, g, shift, s1, s2, xcs, csum, gram, D, PREC: tl.constexpr):
    """LayerNorm's (mean, rstd) of each row of out = alpha x + g Delta, Delta = P C, from pass 1's
    sums, before out exists. Around alpha s, with s pass 1's shift, y = out - alpha s =
    alpha (x - s) + g Delta has
        sum y   = alpha sum(x - s) + g P (C 1),
        sum y^2 = alpha^2 sum (x - s)^2 + 2 alpha g P ((x - s) C^T) + g^2 P G P^T,  G = C C^T,
    whose terms do not cancel unless g Delta undoes x (`shifted_row_stats` says why the shift)."""
    pg = _mm(p, gram, tl.zeros(p.shape, dtype=tl.float32), PREC)
    sy = alpha * s1 + g * tl.sum(p * csum[None, :], axis=1)
    sy2 = alpha * alpha * s2 + 2.0 * alpha * g * tl.sum(p * xcs, axis=1) + g * g * tl.sum(p * pg, axis=1)
    mean, _, _, rstd, _ = shifted_row_stats(sy, sy2, alpha * shift, D, _LN_EPS)
    return mean, rstd


@triton.jit
def _oca_fwd_kernel(X, A, C, G, OUT, XA, COS2,
                    N, D, M,
                    s_xb, s_xn, s_xd, s_ab, s_ad, s_am, s_cb, s_cm, s_cd, s_ob, s_on, s_od,
                    ORTH: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
                    BLOCK_M: tl.constexpr, PREC: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
                    STAGES: tl.constexpr):
    """out = x + gate * orth(Delta, x) and, with NORM, XA = LN(out) (no affine; XA has out's
    strides), written in the same output pass from statistics known before it (`_out_stats`)."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    # pass 1: statistics, scores S = LN(x) @ A and, for the projection, x @ C^T
    mean, rstd, xx, s, xc, oc, do_x, cola, shift, s1, s2, xcs, csum, gram = _one_pass(
        X, b, offs_n, mask_n, D, s_xb, s_xn, s_xd, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd,
        X, s_xb, s_xn, s_xd, offs_m, mask_m, ORTH, False, NORM, BLOCK_N, BLOCK_DC, BLOCK_M, PREC)
    p = _softmax_rows(s, mask_m)
    dot = tl.sum(p * xc, axis=1)  # <Delta, x>
    k = dot / (xx + _ORTH_EPS)  # hard: Delta - k x
    g = tl.load(G).to(tl.float32)
    dd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NORM:
        if ORTH == ORTH_HARD:
            alpha = 1.0 - g * k
        else:
            alpha = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
        mean_o, rstd_o = _out_stats(p, alpha, g, shift, s1, s2, xcs, csum, gram, D, PREC)
    # pass 2: Delta = P @ C, the projection and the residual, chunk by chunk, backwards: from the
    # chunk pass 1 ended on towards the ones it read longest ago, so that each re-read comes as
    # soon after the first read as it can (L1/L2; forwards, every chunk would come a tile later)
    last = last_chunk_start(D, BLOCK_DC)
    # pipelined explicitly: the kernel's num_stages alone left this loop's loads unpipelined (SASS)
    for i in tl.range(0, tl.cdiv(D, BLOCK_DC), num_stages=STAGES):
        offs_d = last - i * BLOCK_DC + tl.arange(0, BLOCK_DC)
        mask_d = offs_d < D
        x = load_tile(X + b * s_xb, s_xn, s_xd, offs_n, offs_d, mask_n, mask_d)
        c = load_tile(C + b * s_cb, s_cm, s_cd, offs_m, offs_d, mask_m, mask_d)
        delta = _mm(p, c, tl.zeros((BLOCK_N, BLOCK_DC), dtype=tl.float32), PREC)
        if ORTH == ORTH_HARD:
            out = x + g * (delta - k[:, None] * x)
        else:
            out = x + g * delta
        if ORTH == ORTH_SOFT:
            dd += tl.sum(delta * delta, axis=1)
        offs_o = b * s_ob + offs_n[:, None] * s_on + offs_d[None, :] * s_od
        mask_o = mask_n[:, None] & mask_d[None, :]
        tl.store(OUT + offs_o, cast_out(out, OUT.dtype.element_ty, ROUND_BY_HAND), mask=mask_o)
        if NORM:
            xa = (out - mean_o[:, None]) * rstd_o[:, None]
            tl.store(XA + offs_o, cast_out(xa, XA.dtype.element_ty, ROUND_BY_HAND), mask=mask_o)
    if ORTH == ORTH_SOFT:  # soft: cos^2(Delta, x) per token
        tl.store(COS2 + b * N + offs_n, dot * dot / (dd * xx + _COS2_EPS), mask=mask_n)


@triton.jit
def oca_row_grads(p, oc, xc, pg, dot, dd, xx, do_x, gcs, g, HARD: tl.constexpr, SOFT: tl.constexpr):
    """The OCA backward of one tile of rows, reduced to M-sized terms (shared with the fused layer).

    p: the probabilities P, oc = dout C^T, xc = x C^T, pg = P C C^T (soft only), dot = <Delta, x>,
    dd = |Delta|^2 (soft only), xx = <x, x>, do_x = <dout, x> (hard only), gcs the upstream cos^2
    gradient (soft only), g the gate. Returns the gate-gradient terms dg, dDelta = g dout + alpha x
    + beta Delta's alpha and beta, dS (the scores' gradient) and dx's coefficients c_do (of dout,
    besides 1), c_dl (of Delta), c_x (of x)."""
    zero = dot * 0.0
    do_delta = tl.sum(p * oc, axis=1)  # <dout, Delta>
    if HARD:
        inv = 1.0 / (xx + _ORTH_EPS)
        k = dot * inv
        sc = g * do_x * inv  # <x, g dout> / (<x, x> + eps)
        dg = do_delta - k * do_x  # dout . u
        alpha = -sc
        beta = zero
        dp = g * oc + alpha[:, None] * xc
        c_do = -k * g
        c_dl = -sc
        c_x = 2.0 * k * sc
    elif SOFT:
        den = dd * xx + _COS2_EPS
        cos2 = dot * dot / den
        dg = do_delta
        alpha = gcs * 2.0 * dot / den
        beta = -gcs * 2.0 * cos2 * xx / den
        dp = g * oc + alpha[:, None] * xc + beta[:, None] * pg
        c_do = zero
        c_dl = alpha
        c_x = -gcs * 2.0 * cos2 * dd / den
    else:
        dg = do_delta
        alpha = zero
        beta = zero
        dp = g * oc
        c_do = zero
        c_dl = zero
        c_x = zero
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    return dg, alpha, beta, ds, c_do, c_dl, c_x


# Row scalars the rows kernel hands to the column kernel, (B, N_ROWS, N) fp32.
_R_MEAN, _R_ALPHA, _R_BETA, _R_KDO = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
_R_KDL, _R_KX, _R_Q, _R_K0 = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
N_ROWS = 8


@triton.jit
def _oca_bwd_rows_kernel(X, A, C, G, GRAM, DOUT, DCOS2, P_S, DS_S, ROWS, DG_PART,
                         N, D, M,
                         s_xb, s_xn, s_xd, s_ab, s_ad, s_am, s_cb, s_cm, s_cd,
                         s_gb, s_gn, s_gd, s_eb, s_en,
                         ORTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
                         BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Backward, per token: everything that needs whole rows, reduced to M-sized quantities.

    Writes P and rstd * dS (B, N, M), eight row scalars (B, 8, N) and a dgate partial per tile;
    dx, dA and dC are then column-local (see _oca_bwd_cols_kernel). Every row quantity reduces
    to products with M columns, accumulated over d chunks in pass 2:
      <Delta, x> = rowsum(P * xC), <dout, Delta> = rowsum(P * oC), |Delta|^2 = rowsum(P * (P G)),
      dP = dDelta @ C^T = g oC + alpha xC + beta P G,
      mean(dLN) = dS . colsum(A) / d, mean(dLN * LN(x)) = dS . S / d,
    with xC = x @ C^T, oC = dout @ C^T, G = C C^T (from the launcher), dLN = dS @ A^T.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mean, rstd, xx, s, xc, oc, do_x, cola, _, _, _, _, _, _ = _one_pass(
        X, b, offs_n, mask_n, D, s_xb, s_xn, s_xd, A, s_ab, s_ad, s_am, C, s_cb, s_cm, s_cd,
        DOUT, s_gb, s_gn, s_gd, offs_m, mask_m, ORTH, True, False, BLOCK_N, BLOCK_DC, BLOCK_M, PREC)
    p = _softmax_rows(s, mask_m)
    g = tl.load(G).to(tl.float32)
    dot = tl.sum(p * xc, axis=1)
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pg = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    dd = zero
    gcs = zero
    if ORTH == ORTH_SOFT:
        gm = tl.load(GRAM + b * M * M + offs_m[:, None] * M + offs_m[None, :],
                     mask=mask_m[:, None] & mask_m[None, :], other=0.0)
        pg = _mm(p, gm, pg, PREC)  # Delta @ C^T
        dd = tl.sum(p * pg, axis=1)  # |Delta|^2
        gcs = tl.load(DCOS2 + b * s_eb + offs_n * s_en, mask=mask_n, other=0.0).to(tl.float32)
    dg, alpha, beta, ds, c_do, c_dl, c_x = oca_row_grads(p, oc, xc, pg, dot, dd, xx, do_x, gcs, g,
                                                         ORTH == ORTH_HARD, ORTH == ORTH_SOFT)
    m1 = tl.sum(ds * cola[None, :], axis=1) / D
    m2 = tl.sum(ds * s, axis=1) / D  # s: the unmasked scores (0 in padded columns)
    # dx = dout + dx_direct + rstd (dLN - m1 - (x - mean) rstd m2)
    #    = k_do dout + k_dl Delta + c_x x - q (x - mean) + k_0 + (rstd dS) @ A^T
    tl.store(DG_PART + b * tl.num_programs(0) + pid, tl.sum(tl.where(mask_n, dg, 0.0), axis=0))
    smask = mask_n[:, None] & mask_m[None, :]
    soffs = offs_n[:, None] * M + offs_m[None, :]
    tl.store(P_S + b * N * M + soffs, p, mask=smask)
    tl.store(DS_S + b * N * M + soffs, ds * rstd[:, None], mask=smask)
    rows = ROWS + b * 8 * N + offs_n
    tl.store(rows + _R_MEAN * N, mean, mask=mask_n)
    tl.store(rows + _R_ALPHA * N, alpha, mask=mask_n)
    tl.store(rows + _R_BETA * N, beta, mask=mask_n)
    tl.store(rows + _R_KDO * N, 1.0 + c_do, mask=mask_n)
    tl.store(rows + _R_KDL * N, c_dl, mask=mask_n)
    tl.store(rows + _R_KX * N, c_x, mask=mask_n)
    tl.store(rows + _R_Q * N, rstd * rstd * m2, mask=mask_n)
    tl.store(rows + _R_K0 * N, -rstd * m1, mask=mask_n)


@triton.jit
def _oca_bwd_cols_kernel(X, DOUT, A, C, G, P_S, DS_S, ROWS, DX, DA_PART, DC_PART,
                         N, D, M, n_tiles,
                         s_xb, s_xn, s_xd, s_gb, s_gn, s_gd, s_ab, s_ad, s_am, s_cb, s_cm, s_cd,
                         s_dxb, s_dxn, s_dxd,
                         ORTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
                         BLOCK_M: tl.constexpr, PREC: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """Backward, per column chunk: dx, and the token reductions dA = LN(x)^T dS, dC = P^T dDelta.

    Grid (d chunks, token splits, B): a program owns BLOCK_DC columns of one sample and loops
    over the token tiles of its split, writing dx for them and accumulating (BLOCK_DC x BLOCK_M)
    fp32 partials of dA and dC^T, stored once at the end to its own slot of (B, splits, ...).
    Tiles are token-major, (BLOCK_N x BLOCK_DC), so the chunk's A^T and C (BLOCK_M x BLOCK_DC),
    read once per program, are the right operands of the products: sm_90's warpgroup MMA reads
    them from shared memory. (Held the other way round, as left operands, they stayed in every
    warp's registers and were re-read for every tile: 3.5 times their size at ViT-B/16, and P
    and rstd*dS were read twice, once transposed.)
    LN(x)^T dS = (x - mean)^T (rstd dS), so rstd never needs its own load.
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
    offs_m = tl.arange(0, BLOCK_M)
    mask_d = offs_d < D
    mask_m = offs_m < M
    dm = mask_d[:, None] & mask_m[None, :]
    md = mask_m[:, None] & mask_d[None, :]
    g = tl.load(G).to(tl.float32)
    # the chunk's A^T and C (BLOCK_M, BLOCK_DC), read once: the right operands of the products,
    # which sm_90's warpgroup MMA reads from shared memory
    at = tl.load(A + b * s_ab + offs_m[:, None] * s_am + offs_d[None, :] * s_ad, mask=md, other=0.0).to(tl.float32)
    cc = at  # not read with orth="none"
    if ORTH != ORTH_NONE:
        cc = tl.load(C + b * s_cb + offs_m[:, None] * s_cm + offs_d[None, :] * s_cd, mask=md, other=0.0).to(tl.float32)
    acc_a = tl.zeros((BLOCK_DC, BLOCK_M), dtype=tl.float32)
    acc_ct = tl.zeros((BLOCK_DC, BLOCK_M), dtype=tl.float32)
    for t in range(pid_s, n_tiles, n_splits):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tmask = mask_n[:, None] & mask_d[None, :]  # (BLOCK_N, BLOCK_DC)
        xt = tl.load(X + b * s_xb + offs_n[:, None] * s_xn + offs_d[None, :] * s_xd,
                     mask=tmask, other=0.0).to(tl.float32)
        dot_ = tl.load(DOUT + b * s_gb + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd,
                       mask=tmask, other=0.0).to(tl.float32)
        nm = mask_n[:, None] & mask_m[None, :]
        sbase = b * N * M
        p = tl.load(P_S + sbase + offs_n[:, None] * M + offs_m[None, :], mask=nm, other=0.0)
        dsr = tl.load(DS_S + sbase + offs_n[:, None] * M + offs_m[None, :], mask=nm, other=0.0)
        rows = ROWS + b * 8 * N + offs_n
        mean = tl.load(rows + _R_MEAN * N, mask=mask_n, other=0.0)
        k_do = tl.load(rows + _R_KDO * N, mask=mask_n, other=0.0)
        k_x = tl.load(rows + _R_KX * N, mask=mask_n, other=0.0)
        q = tl.load(rows + _R_Q * N, mask=mask_n, other=0.0)
        k_0 = tl.load(rows + _R_K0 * N, mask=mask_n, other=0.0)
        alpha = tl.load(rows + _R_ALPHA * N, mask=mask_n, other=0.0)
        xm = tl.where(tmask, xt - mean[:, None], 0.0)
        dx = _mm(dsr, at, tl.zeros((BLOCK_N, BLOCK_DC), dtype=tl.float32), PREC)  # rstd dS A^T
        dx += k_do[:, None] * dot_ + k_x[:, None] * xt - q[:, None] * xm + k_0[:, None]
        ddelta = g * dot_ + alpha[:, None] * xt
        if ORTH != ORTH_NONE:
            delta = _mm(p, cc, tl.zeros((BLOCK_N, BLOCK_DC), dtype=tl.float32), PREC)  # Delta = P C
            k_dl = tl.load(rows + _R_KDL * N, mask=mask_n, other=0.0)
            dx += k_dl[:, None] * delta
            if ORTH == ORTH_SOFT:
                beta = tl.load(rows + _R_BETA * N, mask=mask_n, other=0.0)
                ddelta += beta[:, None] * delta
        tl.store(DX + b * s_dxb + offs_n[:, None] * s_dxn + offs_d[None, :] * s_dxd,
                 cast_out(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=tmask)
        acc_a = _mm(tl.trans(xm), dsr, acc_a, PREC)  # sum over tokens of (x - mean)^T (rstd dS)
        acc_ct = _mm(tl.trans(ddelta), p, acc_ct, PREC)  # (P^T dDelta)^T
    part = b * n_splits + pid_s
    tl.store(DA_PART + part * D * M + offs_d[:, None] * M + offs_m[None, :],
             cast_out(acc_a, DA_PART.dtype.element_ty, ROUND_BY_HAND), mask=dm)
    tl.store(DC_PART + part * M * D + offs_m[None, :] * D + offs_d[:, None],
             cast_out(acc_ct, DC_PART.dtype.element_ty, ROUND_BY_HAND), mask=dm)


# --------------------------------------------------------------------------------------------
# 2. launchers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OcaConfig:
    BLOCK_M: int          # M padded: max(16, next_power_of_2(M)), masked
    BLOCK_DC: int         # column chunk of the forward kernel
    rows_block_dc: int    # column chunk of the backward rows kernel
    fwd_block_n: int      # tokens per program, forward
    fwd_warps: int
    rows_block_n: int     # tokens per program, backward rows kernel
    rows_warps: int
    cols_block_n: int     # backward column kernel: tokens per loop step
    cols_block_d: int     # ... and columns per program
    cols_warps: int
    cols_splits: int      # token splits per sample: dA/dC partials are (B, cols_splits, d, M)
    num_stages: int
    cols_prec: Optional[str] = None  # the column kernel's dot precision, where not the op's
    cols_stages: int = 1  # the column kernel's pipeline stages
    max_registers: int = runtime.MAX_REGISTERS  # per thread, every kernel (ptxas's ceiling)
    fwd_norm: bool = True  # `oca_norm_fwd` writes LN(out) in the forward's output pass (else torch's, after)
    norm_block_dc: Optional[int] = None  # that forward's column chunk, where not BLOCK_DC


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _chunk(d: int, cap: int) -> int:
    """The widest power-of-two chunk <= cap that divides d (no masked waste for d % 16 == 0),
    at least 16 (the tl.dot minimum); other d get a masked last chunk."""
    for w in (128, 64, 32, 16):
        if w <= cap and d % w == 0:
            return w
    return max(16, min(cap, _pow2(d)))


def _oca_config(B: int, N: int, d: int, M: int, prec: str, interpret: bool,
                n_sm: int = 132, cc: int = 90, orth: str = "hard") -> OcaConfig:
    """Every launch parameter of the three kernels, chosen in one place.

    tl.dot needs every tile dimension >= 16 on the GPU, so M is padded to BLOCK_M >= 16 (masked
    to -inf before the softmax) and token tiles have >= 16 rows (masked).

    GPU. No kernel holds a whole row. The forward and the backward-rows kernel stream x (and
    dout) in column chunks: one pass, then (forward) the output pass, walking them backwards,
    whose re-reads are meant to hit L1/L2 so that HBM sees one read of x.
    Their registers are a few (BLOCK_N x BLOCK_DC) fp32 chunk tiles plus (BLOCK_N x BLOCK_M)
    accumulators, independent of d: 128 tokens x 32 columns at 8 warps is 16 fp32 values per
    thread per chunk tile (75-190 registers, sm_80 and sm_90, BLOCK_M <= 32). Every tile
    requests the per-sample A and C again, so tiles are as tall as registers allow: 128 tokens
    rather than 64 halved their share (0.97 -> 0.49 passes forward at ViT-B/16), and past 128
    tokens tf32 at BLOCK_M 16 takes 256 (one tile per ViT-B/16 sample: 0.49 -> 0.24; 96-208
    registers, the rows kernel with 16-column chunks; 224 with 32). The forward's chunk width
    is the widest of 32/16 dividing d (no masked columns for d % 16 == 0).
    The backward-column kernel holds a (BLOCK_DC x BLOCK_M) dA and a dC^T accumulator across its
    token loop, the chunk's A^T and C (shared memory on sm_90), plus (16 x BLOCK_DC) tiles of x,
    dout, Delta, dx; each column program re-reads its tokens' scratch (P, rstd*dS and the row
    scalars), so the chunk is as wide as registers allow: 256 columns at 8 warps on sm_90
    (184-216 registers; 128 with BLOCK_M >= 32 or tf32x3, 64 when BLOCK_M = 64). Smaller tiles
    where registers ran out: tf32x3 with BLOCK_M >= 32 (three products per dot on hi/lo
    operands), and sm_80, whose MMA keeps a copy of the second operand in every warp (64
    columns, 32 with tf32x3: 128 spilled 32-136 bytes). tf32x3 takes 16 columns a program
    at BLOCK_M >= 32, and at BLOCK_M = 64 IEEE float32 products instead (as accurate, without
    tensor cores: tf32x3's hi/lo halves spilled 8-32 bytes there, whatever the warps), and
    16-column chunks in the rows kernel (on sm_80, or at BLOCK_M >= 32);
    BLOCK_M = 64 with tf32x3 takes 16-token forward tiles (the one-pass forward holds x @ A and
    x @ C^T together: 32 tokens spilled on triton 3.6) and 16-token, 4-warp rows tiles.
    Headroom: every configuration must compile without a spill with ptxas capped at 224 registers
    (tests/kernel_compile_check.py, REG_BUDGET), though it runs with 255 available: triton 3.8's
    ptxas spilled two configurations that 3.6's fitted at 255, so a tile that only just fits is a
    failure waiting for the next compiler. All of this was chosen by compiling every configuration
    for sm_90 and sm_80 on triton 3.6 and 3.8 and reading ptxas's register/spill report
    (tests/kernel_compile_check.py --full); shared memory stays under 64 KB.
    cols_splits: a sample's tokens are split over several programs only when B * (d chunks) is
    under half the target of four programs per SM (as many splits as stay within it: the text
    tower's 2 x 256 programs at B = 256 are not split), so at large B there is one split and the
    kernel stores dA and dC themselves, in the factors' dtype. `prec` and `cc` are arguments
    because the tiles depend on them; x's dtype does not matter beyond `prec` (all arithmetic is fp32).

    Interpreter: each program is a sequence of numpy steps, so the fewest and largest programs
    are fastest: a whole sample (up to 256 tokens) per program, one column chunk, one split.
    """
    if d > MAX_D:
        raise ValueError(f"d={d} > {MAX_D} is not supported by the fused OCA kernel")
    if M > MAX_M:
        raise ValueError(f"M={M} > {MAX_M} is not supported by the fused OCA kernel")
    BM = max(16, _pow2(M))
    # LN(out) in the forward's output pass (`oca_norm_fwd`) adds C C^T, P C C^T and a second store:
    # at BLOCK_M 16 every configuration compiles without a spill (the compile check, triton 3.6 and
    # 3.8; 16-column chunks at 16 warps, `_sixteen_warps_config`); with 32 or 64 it spilled 8-196
    # bytes (tf32x3 at 32 on sm_90, 64 on sm_80; triton 3.8), so there torch's LayerNorm follows.
    norm = BM == 16
    if interpret:
        bn = min(256, max(16, _pow2(N)))
        bd = max(16, _pow2(d))
        return OcaConfig(BM, bd, bd, bn, 4, bn, 4, bn, bd, 4, 1, 1, fwd_norm=norm)
    # tf32x3 triples the dot operands held in registers; the heavy cases get smaller tiles.
    # Before sm_90 (no warpgroup MMA) every warp keeps its own copy of a dot's second operand in
    # registers, so BLOCK_M = 64 needs smaller tiles there too.
    if cc >= 90 and prec == "tf32" and BM == 16:
        return _sixteen_warps_config(B, N, d, n_sm, orth)
    return replace(_register_bound_config(B, N, d, BM, prec, n_sm, cc), fwd_norm=norm)


def _register_bound_config(B: int, N: int, d: int, BM: int, prec: str, n_sm: int, cc: int) -> OcaConfig:
    """`_oca_config`'s tiles where registers bind: tf32x3 (float32 and float16 x), BLOCK_M > 16,
    and sm_80 (8-warp CTAs up to 224 registers; `_oca_config` says why each)."""
    x3 = prec == "tf32x3"
    heavy = x3 and BM >= 32
    # Every token tile requests A and C again: past 128 tokens (ViT-B/16's 197), tf32 at
    # BLOCK_M 16 takes 256-token tiles, one per sample there, with 16-column rows-kernel chunks.
    tall = not x3 and BM == 16 and N > 128
    fwd_bn = 16 if (x3 and BM == 64) else (256 if tall else 128)
    if BM == 64:
        rows_bn, rows_warps = (16, 4) if heavy else (32, 8)
    else:
        rows_bn, rows_warps = (256 if tall else 128), 8
    cols_bn = 16
    if heavy:
        cols_bd = 16
    elif BM == 64:
        cols_bd = 32 if cc < 90 else 64
    else:  # sm_80's MMA keeps the A^T and C chunks in every warp's registers: half the width
        cols_bd = (128 if (x3 or BM > 16) else 256) if cc >= 90 else (32 if x3 else 64)
    cols_bd = min(cols_bd, max(16, _pow2(d)))
    cols_warps = 4 if (_pow2(d) <= 32 and BM <= 16) else 8  # d <= 32: a tiny tile
    rows_dc = _chunk(d, 16 if ((x3 and cc < 90) or heavy or tall) else 32)
    chunks = triton.cdiv(d, cols_bd)
    splits = policy.token_splits(N, cols_bn, B, chunks, n_sm)
    fwd_bn, rows_bn = (policy.tokens_to_fill(bn, B, N, n_sm) for bn in (fwd_bn, rows_bn))
    return OcaConfig(BLOCK_M=BM, BLOCK_DC=_chunk(d, 32), rows_block_dc=rows_dc,
                     fwd_block_n=fwd_bn, fwd_warps=8,
                     rows_block_n=rows_bn, rows_warps=rows_warps,
                     cols_block_n=cols_bn, cols_block_d=cols_bd, cols_warps=cols_warps,
                     cols_splits=splits, num_stages=policy.PIPELINE_STAGES,
                     cols_prec="ieee" if heavy and BM == 64 else None,
                     # pipelined, the column kernel spilled: 128 bytes with IEEE products at
                     # BLOCK_M 64 (sm_90), 8-32 on sm_80 (triton 3.6; capped at 224)
                     cols_stages=1 if (heavy and BM == 64) or cc < 90 else policy.PIPELINE_STAGES)


def _sixteen_warps_config(B: int, N: int, d: int, n_sm: int, orth: str) -> OcaConfig:
    """sm_90, bfloat16 x (TF32 products), M <= 16: every kernel at 16 warps per SM.

    The tiles stay those that request A and C once per ViT-B/16 sample (256 tokens past 128, else
    128; 256-column programs), but every launch names at most 128 registers a thread, so that
    16 warps share an SM: one 16-warp CTA for a 256-token tile and the column kernel, two 8-warp
    CTAs for a 128-token forward tile (16-warp CTAs of 8 warps' work doubled its loop trips),
    where 8-warp CTAs of 173-224 registers held 8 warps. Measured with ptxas (triton 3.8, sm_90;
    as launched / capped at 112, the compile check's headroom, no spill): forward, 32-column
    chunks, 127 / 112 at ViT-B/16 and 128 / 112 at the text shape; rows kernel 113 / 110 with
    16-column chunks at ViT-B/16 (32 spilled 52 bytes at 112) and 115 / 104 with 32 at the text
    shape; column kernel 113 / 111 with 2 stages (3 spilled 8 bytes at 112). The forward that also
    writes LN(out) (`oca_norm_fwd`) takes 16-column chunks: with 32, triton 3.6 spilled 4-16 bytes
    at 112 at ViT-B/16 and 8 as launched (44-48 at 112) at the text shape's 8 warps (3.8 fitted);
    with 16, 128 / 110-112 and no spill on both, and the MODEL's time is the same (memory-bound). With orth="soft"
    (whose cos^2 terms the column kernel also holds) 256 columns spilled 8-12 bytes whatever the
    stages (triton 3.6 and 3.8): 128 columns. Smaller tiles (small batches) take fewer warps, and
    16-column rows chunks (16 tokens at 4 warps spilled 16 bytes with 32)."""
    tokens = policy.tokens_to_fill(256 if N > 128 else 128, B, N, n_sm)
    cols_bd = min(128 if orth == "soft" else 256, max(16, _pow2(d)))
    chunks = triton.cdiv(d, cols_bd)
    splits = policy.token_splits(N, 16, B, chunks, n_sm)
    warps = lambda tile, full: 16 if tile >= full else (8 if tile >= 64 else 4)  # noqa: E731
    return OcaConfig(BLOCK_M=16, BLOCK_DC=_chunk(d, 32), rows_block_dc=_chunk(d, 32 if tokens == 128 else 16),
                     fwd_block_n=tokens, fwd_warps=warps(tokens, 256), rows_block_n=tokens,
                     rows_warps=warps(tokens, 128), cols_block_n=16, cols_block_d=cols_bd,
                     cols_warps=warps(cols_bd, 128), cols_splits=splits, num_stages=policy.PIPELINE_STAGES,
                     cols_stages=2, max_registers=policy.OCCUPANCY_REGISTERS, norm_block_dc=_chunk(d, 16))


def _precision(x: torch.Tensor, M: int = 16, cc: int = 90) -> str:
    """tl.dot input precision on the GPU, by the one policy (`policy.fp32_accurate_products`):
    "tf32" for bfloat16 x and for float32 x below "highest" matmul precision, else "tf32x3" (three
    TF32 products on a hi/lo split, about float32 accuracy, `_mm`); float32 x at BLOCK_M 64 on sm_80
    keeps tf32x3's smaller tiles, its float32 tiles at tf32's spilled 16-24 bytes (triton 3.8). The
    a/c/gate dtypes do not matter: their gradients carry the accuracy of the x path (bf16 x with
    fp32 a: tf32, about 5e-4 relative in dA). Under the interpreter every product is exact fp32,
    and "tf32x3" still runs its three-product split, so the split's algebra is tested on the CPU."""
    if policy.fp32_accurate_products(x.dtype) or (x.dtype == torch.float32 and cc < 90 and M > 32):
        return "tf32x3"
    return "tf32"


def _check_sizes(x: torch.Tensor, a: torch.Tensor) -> Tuple[int, int, int, int]:
    B, N, d = x.shape
    M = a.shape[-1]
    if d > MAX_D:
        raise ValueError(f"x has shape {tuple(x.shape)}: the fused OCA kernel supports d <= {MAX_D} "
                         f"; use impl='reference'")
    if M > MAX_M:
        raise ValueError(f"a has shape {tuple(a.shape)}: the fused OCA kernel supports M <= {MAX_M} "
                         f"queries; use impl='reference'")
    return B, N, d, M


def oca_fwd(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor,
            orth: str = "hard") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward launch. x (B, N, d), a (B, d, M), c (B, M, d), gate () -> out (B, N, d) in x's
    dtype and, for orth="soft", cos2 (B, N) float32 (else None). Inputs may be strided views."""
    out, _, cos2 = _launch_fwd(x, a, c, gate, orth, norm=False)
    return out, cos2


def oca_norm_fwd(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor,
                 orth: str = "hard") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`oca_fwd` that also gives LN(out) (no affine) in x's dtype: (out, LN(out), cos2 or None).
    Written in the same output pass, from the statistics of out before its rounding to x's dtype
    (at BLOCK_M 16, M <= 16; else torch's LayerNorm of the rounded out, `_oca_config` says why)."""
    return _launch_fwd(x, a, c, gate, orth, norm=True)


def layer_norm_rows(t: torch.Tensor) -> torch.Tensor:
    """Torch's LayerNorm over the last axis, no affine, the kernels' eps: LN(out) where the output
    pass does not form it (BLOCK_M > 16, and `oca_norm` under torch.compile)."""
    return F.layer_norm(t, t.shape[-1:], eps=policy.LN_EPS)


def _launch_fwd(x, a, c, gate, orth: str, norm: bool):
    B, N, d, M = _check_sizes(x, a)
    gpu_tiles, n_sm, cc = runtime.tiling(x.device)
    prec = _precision(x, M, cc)
    cfg = _oca_config(B, N, d, M, prec, not gpu_tiles, n_sm, cc, orth)
    in_pass = norm and cfg.fwd_norm
    out = runtime.empty((B, N, d), dtype=x.dtype, device=x.device)
    # XA is read through out's strides; without NORM the kernel never touches it (out stands in)
    xa = runtime.empty((B, N, d), dtype=x.dtype, device=x.device) if in_pass else out
    cos2 = runtime.empty((B, N), dtype=torch.float32, device=x.device) if orth == "soft" else out
    runtime.launch(_oca_fwd_kernel, (triton.cdiv(N, cfg.fwd_block_n), B),
            x, a, c, gate, out, xa, cos2, N, d, M,
            *x.stride(), *a.stride(), *c.stride(), *out.stride(),
            ORTH=ORTH_CODES[orth], NORM=in_pass, BLOCK_N=cfg.fwd_block_n,
            BLOCK_DC=(cfg.norm_block_dc or cfg.BLOCK_DC) if in_pass else cfg.BLOCK_DC,
            BLOCK_M=cfg.BLOCK_M, PREC=prec, ROUND_BY_HAND=interpreting(), STAGES=cfg.num_stages,
            num_warps=cfg.fwd_warps, num_stages=cfg.num_stages, maxnreg=cfg.max_registers)
    if norm and not in_pass:
        xa = layer_norm_rows(out)
    return out, (xa if norm else None), (cos2 if orth == "soft" else None)


def oca_bwd(dout: torch.Tensor, dcos2: Optional[torch.Tensor], x: torch.Tensor, a: torch.Tensor,
            c: torch.Tensor, gate: torch.Tensor, orth: str = "hard"):
    """Backward launch: (dx, da, dc, dgate), each in its input's dtype. dout (B, N, d) and dcos2
    (B, N) (or None) may be strided views.

    Buffers besides the gradients, all fp32: dgate partials (B, token tiles); the scratch the rows
    kernel hands to the column kernel, P and rstd*dS (B, N, M) and eight row scalars (B, 8, N);
    for orth="soft" the Gram matrix C C^T (B, M, M); dA/dC partials (B, cols_splits, d, M) and
    (B, cols_splits, M, d), summed here with torch (deterministic: no atomics anywhere); with one
    split they are dA and dC themselves, stored by the kernel in a's and c's dtype.
    """
    B, N, d, M = _check_sizes(x, a)
    gpu_tiles, n_sm, cc = runtime.tiling(x.device)
    prec = _precision(x, M, cc)
    cfg = _oca_config(B, N, d, M, prec, not gpu_tiles, n_sm, cc, orth)
    dev = x.device
    n_tiles = triton.cdiv(N, cfg.rows_block_n)
    dg_part = runtime.empty((B, n_tiles), dtype=torch.float32, device=dev)
    p_s = runtime.empty((B, N, M), dtype=torch.float32, device=dev)
    ds_s = runtime.empty((B, N, M), dtype=torch.float32, device=dev)
    rows = runtime.empty((B, N_ROWS, N), dtype=torch.float32, device=dev)
    if orth != "soft" or dcos2 is None:  # no upstream cos^2 gradient: read a zero, stride 0
        dcos2 = torch.zeros((1, 1), dtype=torch.float32, device=dev).expand(B, N)
    if orth == "soft":  # |Delta|^2 = P G P^T per token, G = C C^T (B, M, M)
        cf = c.float()
        gram = torch.matmul(cf, cf.transpose(1, 2)).contiguous()
    else:
        gram = dg_part  # not read
    runtime.launch(_oca_bwd_rows_kernel, (n_tiles, B),
            x, a, c, gate, gram, dout, dcos2, p_s, ds_s, rows, dg_part, N, d, M,
            *x.stride(), *a.stride(), *c.stride(), *dout.stride(), *dcos2.stride(),
            ORTH=ORTH_CODES[orth], BLOCK_N=cfg.rows_block_n, BLOCK_DC=cfg.rows_block_dc,
            BLOCK_M=cfg.BLOCK_M, PREC=prec, num_warps=cfg.rows_warps, num_stages=cfg.num_stages,
            maxnreg=cfg.max_registers)
    S = cfg.cols_splits
    dx = runtime.empty((B, N, d), dtype=x.dtype, device=dev)
    # One split (a batch that fills the GPU): a program's partial is the gradient itself, so the
    # kernel stores it in the factor's dtype, with no float32 round trip through torch.
    da_part = runtime.empty((B, S, d, M), dtype=a.dtype if S == 1 else torch.float32, device=dev)
    dc_part = runtime.empty((B, S, M, d), dtype=c.dtype if S == 1 else torch.float32, device=dev)
    runtime.launch(_oca_bwd_cols_kernel, (triton.cdiv(d, cfg.cols_block_d), S, B),
            x, dout, a, c, gate, p_s, ds_s, rows, dx, da_part, dc_part, N, d, M,
            triton.cdiv(N, cfg.cols_block_n),
            *x.stride(), *dout.stride(), *a.stride(), *c.stride(), *dx.stride(),
            ORTH=ORTH_CODES[orth], BLOCK_N=cfg.cols_block_n, BLOCK_DC=cfg.cols_block_d,
            BLOCK_M=cfg.BLOCK_M, PREC=cfg.cols_prec or prec, ROUND_BY_HAND=interpreting(),
            num_warps=cfg.cols_warps, num_stages=cfg.cols_stages, maxnreg=cfg.max_registers)
    dgate = dg_part.sum().to(gate.dtype).reshape(gate.shape)
    da = da_part[:, 0] if S == 1 else da_part.sum(1).to(a.dtype)
    dc = dc_part[:, 0] if S == 1 else dc_part.sum(1).to(c.dtype)
    return dx, da, dc, dgate


# --------------------------------------------------------------------------------------------
# 3. autograd
# --------------------------------------------------------------------------------------------

class _OcaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, c, gate, orth):
        out, cos2 = oca_fwd(x, a, c, gate, orth)
        ctx.save_for_backward(x, a, c, gate)
        ctx.orth = orth
        if cos2 is None:
            return out
        return out, cos2

    @staticmethod
    @once_differentiable  # double backward raises (docs/python.md, "Double backward")
    def backward(ctx, dout, dcos2=None):
        x, a, c, gate = ctx.saved_tensors
        dx, da, dc, dgate = oca_bwd(dout, dcos2, x, a, c, gate, ctx.orth)
        return dx, da, dc, dgate, None


# --------------------------------------------------------------------------------------------
# 4. custom ops (torch.compile) and the public entry point
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("nearl::oca_fwd", mutates_args=())
def _oca_fwd_op(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor,
                orth: str) -> Tuple[torch.Tensor, torch.Tensor]:
    out, cos2 = oca_fwd(x, a, c, gate, orth)
    if cos2 is None:  # the schema has a fixed arity: an empty placeholder when not "soft"
        cos2 = x.new_empty((0,), dtype=torch.float32)
    return out, cos2


@_oca_fwd_op.register_fake
def _(x, a, c, gate, orth):
    B, N, _d = x.shape
    cos2 = x.new_empty((B, N) if orth == "soft" else (0,), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), cos2


@torch.library.custom_op("nearl::oca_bwd", mutates_args=())
def _oca_bwd_op(dout: torch.Tensor, dcos2: Optional[torch.Tensor], x: torch.Tensor, a: torch.Tensor,
                c: torch.Tensor, gate: torch.Tensor, orth: str
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return oca_bwd(dout, dcos2, x, a, c, gate, orth)


@_oca_bwd_op.register_fake
def _(dout, dcos2, x, a, c, gate, orth):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(c, memory_format=torch.contiguous_format),
            torch.empty_like(gate))


def _setup_context(ctx, inputs, output):
    x, a, c, gate, orth = inputs
    ctx.save_for_backward(x, a, c, gate)
    ctx.orth = orth


def _backward(ctx, dout, dcos2):
    x, a, c, gate = ctx.saved_tensors
    if ctx.orth != "soft":
        dcos2 = None
    dx, da, dc, dgate = _oca_bwd_op(dout, dcos2, x, a, c, gate, ctx.orth)
    return dx, da, dc, dgate, None


_oca_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def refuse_float64(*tensors: torch.Tensor) -> None:
    """The OCA kernels' dtype check (`oca`, `oca_norm`): float64 goes to the reference instead."""
    if any(t.dtype == torch.float64 for t in tensors):
        raise ValueError("the fused OCA kernels run float32, bfloat16 and float16; float64 inputs go to the "
                         "reference (nearl.ops.oca routes them there)")


def oca(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, *, orth: str = "hard"):
    """Fused OCA: x + gate * orth(softmax(LN(x) @ a, dim=-1) @ c, x).

    x (B, N, d) float32/bfloat16/float16 with d <= MAX_D (8192), a (B, d, M) and c (B, M, d)
    with M <= 64, gate () -> out (B, N, d) in x's dtype; with orth="soft" returns (out, cos2), cos2
    (B, N) float32. a, c, gate may have another float dtype than x; gradients come back in each
    input's dtype. float64 inputs are refused: `nearl.ops.oca` sends them to the reference.
    Arguments are assumed validated by `nearl.ops.oca`; only the kernel's own limits (d, M) are
    checked here, with a ValueError.
    """
    refuse_float64(x, a, c, gate)
    _check_sizes(x, a)
    if torch.compiler.is_compiling():
        # traced: the custom op, opaque to dynamo, with its fake (shape) and autograd rules
        out, cos2 = _oca_fwd_op(x, a, c, gate, orth)
        return (out, cos2) if orth == "soft" else out
    # eager (GPU or interpreter): the autograd.Function, without the custom-op dispatch cost
    return _OcaFunction.apply(x, a, c, gate, orth)
