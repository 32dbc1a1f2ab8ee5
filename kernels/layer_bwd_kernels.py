"""Triton kernels of the fused NEARL layer's backward (SPEC 3.1): a dout, a rows and a columns kernel.

The forward keeps, besides its inputs and the query attention's log-sum-exp, its first pass's
products and row sums (`layer_kernels._save_products`). With x_out = a x + g (P Cc + P.cbar),
LN(x_out) = rstd2 (a (x - mean) + g P Cc) and the flash-attention backward of the query
attention, every row-level quantity of the backward reduces to M-, H*M- and D-sized terms of
those and of one pass over dout (`layer_bwd_dout_kernel`; the algebra is `layer_fwd_kernel`'s, see
`layer_bwd_rows_kernel`). What remains per column is linear in the tile: G = dL/dx_out (never
stored), dx, and the token reductions dA, dC, dKABS and LN(x_out)^T P, which
`layer_bwd_cols_kernel` accumulates per program in registers and stores once.
"""
import triton
import triton.language as tl

from .casting import cast_out
from .layer_kernels import N_STATS, S_SHIFT, S_SUM, S_SUMSQ
from .oca import oca_row_grads
from .tiles import ORTH_HARD, ORTH_SOFT, load_tile, shifted_row_stats

# Row scalars the rows kernel hands to the columns kernel, (B, N_ROWS, N) float32.
R_MEAN, R_RSTD2, R_COEF, R_PC = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
R_MEAN_G, R_MEAN_GX, R_KDO, R_KX = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
R_Q, R_K0, R_KDL, R_ALPHA, R_BETA = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10), tl.constexpr(11), tl.constexpr(12)
N_ROWS = tl.constexpr(13)


@triton.jit
def _dout_pass(x_base, sxn, sxd, g_base, sgn, sgd, cc_base, scd, scm, d, offs_n, row_ok, offs_c, offs_m, m_ok,
               ORTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
               PREC: tl.constexpr):
    """One pass over dout (and x, for the hard projection's <dout, x>): sum(dout), <dout, x> and
    dout @ Cc^T."""
    dsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    dox = tl.zeros([BLOCK_N], dtype=tl.float32)
    dcc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < d
        dout = load_tile(g_base, sgn, sgd, offs_n, cols, row_ok, col_ok)
        dsum += tl.sum(dout, 1)
        if ORTH == ORTH_HARD:
            dox += tl.sum(dout * load_tile(x_base, sxn, sxd, offs_n, cols, row_ok, col_ok), 1)
        dcc = tl.dot(dout, load_tile(cc_base, scd, scm, cols, offs_m, col_ok, m_ok), dcc, input_precision=PREC)
    return dsum, dox, dcc


@triton.jit
def _load_products(PRODS, STATS, XDO, b, N, M, HM, D, offs_n, row_ok, offs_m, m_ok, offs_hm, hm_ok):
    """What the forward's pass 1 kept of these rows (`layer_kernels._save_products`): the row sums
    of x shifted by s, the shift and (x - s) @ [A | Cc^T | KABS]; and (x - s) DO^T, formed by
    torch as ((x - s) W_v) dU_all^T from the kept (x - s) W_v (DO = dU_all W_v^T)."""
    prods = PRODS + (b * N + offs_n.to(tl.int64)) * (2 * M + HM + D)
    stats = STATS + b * N_STATS * N + offs_n
    s1 = tl.load(stats + S_SUM * N, mask=row_ok, other=0.0)
    s2 = tl.load(stats + S_SUMSQ * N, mask=row_ok, other=0.0)
    shift = tl.load(stats + S_SHIFT * N, mask=row_ok, other=0.0)
    nm = row_ok[:, None] & m_ok[None, :]
    nh = row_ok[:, None] & hm_ok[None, :]
    xa = tl.load(prods[:, None] + offs_m[None, :], mask=nm, other=0.0)
    xcc = tl.load(prods[:, None] + M + offs_m[None, :], mask=nm, other=0.0)
    xk = tl.load(prods[:, None] + 2 * M + offs_hm[None, :], mask=nh, other=0.0)
    xdo = tl.load(XDO + (b * N + offs_n[:, None]) * HM + offs_hm[None, :], mask=nh, other=0.0)
    return s1, s2, shift, xa, xcc, xk, xdo


@triton.jit
def _rows_sample_terms(CBAR, COLA, KSUM, DOSUM, LSE, DELTA, GC, CK, CDO, b, M, HM, offs_m, m_ok, offs_hm, hm_ok):
    """Sample b's M- and HM-sized terms, loaded after the pass (held across it they spilled)."""
    mm_ok = m_ok[:, None] & m_ok[None, :]
    mh_ok = m_ok[:, None] & hm_ok[None, :]
    cbar = tl.load(CBAR + b * M + offs_m, mask=m_ok, other=0.0)
    cola = tl.load(COLA + b * M + offs_m, mask=m_ok, other=0.0)
    ksum = tl.load(KSUM + b * HM + offs_hm, mask=hm_ok, other=0.0)
    dosum = tl.load(DOSUM + b * HM + offs_hm, mask=hm_ok, other=0.0)
    lse = tl.load(LSE + b * HM + offs_hm, mask=hm_ok, other=0.0)
    qdelta = tl.load(DELTA + b * HM + offs_hm, mask=hm_ok, other=0.0)
    gc = tl.load(GC + (b * M + offs_m[:, None]) * M + offs_m[None, :], mask=mm_ok, other=0.0)
    ck = tl.load(CK + (b * M + offs_m[:, None]) * HM + offs_hm[None, :], mask=mh_ok, other=0.0)
    cdo = tl.load(CDO + (b * M + offs_m[:, None]) * HM + offs_hm[None, :], mask=mh_ok, other=0.0)
    return cbar, cola, ksum, dosum, lse, qdelta, gc, ck, cdo


@triton.jit
def _store_rows(P_S, DS_S, DSQ_S, PQ_S, rows, b, N, M, HM, offs_n, row_ok, offs_m, m_ok, offs_hm, hm_ok,
                p, ds_rstd, dsq, pq, mean, rstd2, coef, pc, mean_g, mean_gx, k_do, k_x, q, k0, k_dl, alpha, beta,
                ROUND_BY_HAND: tl.constexpr):
    """What the columns kernel reads of each row: P, rstd dS (B, N, M), dS_q, Pq (B, N, HM), in the
    scratch's dtype (bf16 for bf16 x: the operands of the columns kernel's products, flash-attention's
    rule), and the N_ROWS row scalars (B, N_ROWS, N), float32."""
    nm = row_ok[:, None] & m_ok[None, :]
    nh = row_ok[:, None] & hm_ok[None, :]
    sdt = P_S.dtype.element_ty
    tl.store(P_S + (b * N + offs_n[:, None]) * M + offs_m[None, :], cast_out(p, sdt, ROUND_BY_HAND), mask=nm)
    tl.store(DS_S + (b * N + offs_n[:, None]) * M + offs_m[None, :], cast_out(ds_rstd, sdt, ROUND_BY_HAND), mask=nm)
    tl.store(DSQ_S + (b * N + offs_n[:, None]) * HM + offs_hm[None, :], cast_out(dsq, sdt, ROUND_BY_HAND), mask=nh)
    tl.store(PQ_S + (b * N + offs_n[:, None]) * HM + offs_hm[None, :], cast_out(pq, sdt, ROUND_BY_HAND), mask=nh)
    tl.store(rows + R_MEAN * N, mean, mask=row_ok)
    tl.store(rows + R_RSTD2 * N, rstd2, mask=row_ok)
    tl.store(rows + R_COEF * N, coef, mask=row_ok)
    tl.store(rows + R_PC * N, pc, mask=row_ok)
    tl.store(rows + R_MEAN_G * N, mean_g, mask=row_ok)
    tl.store(rows + R_MEAN_GX * N, mean_gx, mask=row_ok)
    tl.store(rows + R_KDO * N, k_do, mask=row_ok)
    tl.store(rows + R_KX * N, k_x, mask=row_ok)
    tl.store(rows + R_Q * N, q, mask=row_ok)
    tl.store(rows + R_K0 * N, k0, mask=row_ok)
    tl.store(rows + R_KDL * N, k_dl, mask=row_ok)
    tl.store(rows + R_ALPHA * N, alpha, mask=row_ok)
    tl.store(rows + R_BETA * N, beta, mask=row_ok)


@triton.jit
def _forward_rows(xa, xcc, mean, dm, m2, rstd, xx, cola, cbar, gc, gate, d, m_ok, ln_eps, orth_eps,
                  ORTH: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """The forward's row terms, recomputed from the products: OCA's scores and P, P.cbar, x C^T,
    <Delta, x>, P Cc Cc^T, |P Cc|^2, x's coefficient in x_out and x_out's rstd."""
    s_oca = rstd[:, None] * (xa - dm[:, None] * cola[None, :])  # 0 in padded columns
    p = tl.where(m_ok[None, :], s_oca, float("-inf"))
    p = tl.exp(p - tl.max(p, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    pc = tl.sum(p * cbar[None, :], 1)
    xc = xcc + (d * mean)[:, None] * cbar[None, :]  # x C^T
    dot = tl.sum(p * xc, 1)  # <Delta, x>
    pgc = tl.dot(p, gc, input_precision=PREC)  # P Cc Cc^T
    pgp = tl.sum(p * pgc, 1)  # |P Cc|^2
    if ORTH == ORTH_HARD:
        coef = 1.0 - gate * dot / (xx + orth_eps)
    else:
        coef = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    var2 = coef * coef * m2 + 2.0 * coef * gate * tl.sum(p * xcc, 1) + gate * gate * pgp
    rstd2 = 1.0 / tl.sqrt(tl.maximum(var2, 0.0) / d + ln_eps)
    return s_oca, p, pc, xc, dot, pgc, pgp, coef, rstd2


@triton.jit
def _query_grads(xk, xdo, dm, ksum, dosum, rstd2, coef, gate, p, ck, cdo, lse, qdelta, valid, hm_ok, d,
                 PREC: tl.constexpr):
    """The query attention's backward, flash style, from the products: Pq, dS_q and the row means
    of dxn2 and dxn2 * LN(x_out)."""
    s_q = rstd2[:, None] * (coef[:, None] * (xk - dm[:, None] * ksum[None, :])
                            + gate * tl.dot(p, ck, input_precision=PREC))
    dpq = rstd2[:, None] * (coef[:, None] * (xdo - dm[:, None] * dosum[None, :])
                            + gate * tl.dot(p, cdo, input_precision=PREC))
    pq = tl.where(valid[:, None] & hm_ok[None, :], tl.exp(s_q - lse[None, :]), 0.0)
    dsq = pq * (dpq - qdelta[None, :])
    mean_g = (tl.sum(dsq * ksum[None, :], 1) + tl.sum(pq * dosum[None, :], 1)) / d
    mean_gx = (tl.sum(dsq * s_q, 1) + tl.sum(pq * dpq, 1)) / d
    return pq, dsq, mean_g, mean_gx


@triton.jit
def _g_terms(dcc, dsum, dox, xcc, xk, xdo, cbar, ck, cdo, p, pgc, pq, dsq, rstd2, coef, gate, m2, dm, mean_g, mean_gx,
             d, ORTH: tl.constexpr, BLOCK_N: tl.constexpr):
    """G C^T and <G, x> (hard projection; else 0) per row, G = dL/dx_out, from the products."""
    xn2c = rstd2[:, None] * (coef[:, None] * xcc + gate * pgc)  # LN(x_out) Cc^T
    # dS_q CK^T + Pq CDO^T as a broadcast sum: as two tl.dot with a 16-row left operand it spilled
    # 300-450 bytes (ptxas, sm_90), as this it fits
    oc = dcc + dsum[:, None] * cbar[None, :] + rstd2[:, None] * (
        tl.sum(dsq[:, None, :] * ck[None, :, :] + pq[:, None, :] * cdo[None, :, :], 2) - mean_gx[:, None] * xn2c)
    if ORTH == ORTH_HARD:
        xn2x = rstd2 * (coef * m2 + gate * tl.sum(p * xcc, 1))  # <LN(x_out), x>
        do_x = dox + rstd2 * (tl.sum(dsq * xk, 1) + tl.sum(pq * xdo, 1) - d * mean_g * dm - mean_gx * xn2x)
    else:
        do_x = tl.zeros([BLOCK_N], dtype=tl.float32)
    return oc, do_x


@triton.jit
def layer_bwd_dout_kernel(
    X, sxb, sxn, sxd,
    DOUT, sgb, sgn, sgd,
    CC, scb, scm, scd,
    DTERMS,
    N, d, M,
    ORTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    PREC: tl.constexpr,
):
    """The backward's one pass over dout (and x, for the hard projection), grid (token tiles, B):
    per token dout @ Cc^T, sum(dout) and <dout, x> into DTERMS (B, N, M + 2) float32. Apart from
    the rows kernel, whose epilogue holds it to 16-token tiles, it takes tiles large enough that
    Cc^T, requested once per tile, costs little."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_n < N
    m_ok = offs_m < M
    dsum, dox, dcc = _dout_pass(X + b * sxb, sxn, sxd, DOUT + b * sgb, sgn, sgd, CC + b * scb, scd, scm, d, offs_n,
                                row_ok, offs_c, offs_m, m_ok, ORTH, BLOCK_N, BLOCK_C, BLOCK_M, PREC)
    terms = DTERMS + (b * N + offs_n) * (M + 2)
    tl.store(terms[:, None] + offs_m[None, :], dcc, mask=row_ok[:, None] & m_ok[None, :])
    tl.store(terms + M, dsum, mask=row_ok)
    tl.store(terms + M + 1, dox, mask=row_ok)


@triton.jit
def layer_bwd_rows_kernel(
    DTERMS, PRODS, STATS, XDO,
    CBAR, GATE, LSE, DELTA, DCOS2, sdb, sdn, MASK,
    CK, CDO, GC, COLA, KSUM, DOSUM,
    P_S, DS_S, DSQ_S, PQ_S, ROWS, DG_PART,
    N, d, M, HM, D,
    ln_eps, orth_eps, cos2_eps,
    ORTH: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HM: tl.constexpr, PREC: tl.constexpr,
    ROUND_BY_HAND: tl.constexpr,
):
    """Backward, per token, from per-token terms alone (no (B, N, d) tensor is read).

    From the forward (`_load_products`): the row sums of x shifted by s and (x - s) @ [A | Cc^T |
    KABS]; from torch, (x - s) DO^T = ((x - s) W_v) dU_all^T with DO = dU_all W_v^T; from
    `layer_bwd_dout_kernel`: dout @ Cc^T, sum(dout) and <dout, x>. The per-sample CK = Cc KABS,
    CDO = Cc DO^T, GC = Cc Cc^T, column sums 1^T A, 1^T KABS, DO 1 come from torch.
    Then, with xn2 = LN(x_out):
      S_q = xn2 KABS = rstd2 (a (x - mean) KABS + g P CK),  dPq = xn2 DO^T (likewise with CDO),
      dS_q = Pq (dPq - delta)  (flash-attention: Pq = exp(S_q - lse), delta = rowsum(dU * U)),
      G = dout + rstd2 (dxn2 - mean(dxn2) - xn2 mean(dxn2 xn2)),  dxn2 = dS_q KABS^T + Pq DO,
      mean(dxn2) = (dS_q.1^T KABS + Pq.DO 1) / d,  mean(dxn2 xn2) = (dS_q.S_q + Pq.dPq) / d,
      G C^T = dout Cc^T + sum(dout) cbar + rstd2 (dS_q CK^T + Pq CDO^T - mean(dxn2 xn2) xn2 Cc^T)
      (the cbar terms of dxn2 C^T cancel with mean(dxn2) 1^T C^T), xn2 Cc^T = rstd2 (a xcc + g P GC),
      <G, x> from the same terms. G C^T and <G, x> are all the OCA backward needs of G per row
      (as in kernels/oca.py's rows kernel). Writes P, rstd dS, dS_q, Pq, N_ROWS row scalars and a
      dgate partial per tile.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_hm = tl.arange(0, BLOCK_HM)
    row_ok = offs_n < N
    m_ok = offs_m < M
    hm_ok = offs_hm < HM
    terms = DTERMS + (b * N + offs_n) * (M + 2)
    dcc = tl.load(terms[:, None] + offs_m[None, :], mask=row_ok[:, None] & m_ok[None, :], other=0.0)
    dsum = tl.load(terms + M, mask=row_ok, other=0.0)
    dox = tl.load(terms + M + 1, mask=row_ok, other=0.0)
    s1, s2, shift, xa, xcc, xk, xdo = _load_products(PRODS, STATS, XDO, b, N, M, HM, D, offs_n, row_ok, offs_m, m_ok,
                                                     offs_hm, hm_ok)
    gate = tl.load(GATE).to(tl.float32)
    cbar, cola, ksum, dosum, lse, qdelta, gc, ck, cdo = _rows_sample_terms(
        CBAR, COLA, KSUM, DOSUM, LSE, DELTA, GC, CK, CDO, b, M, HM, offs_m, m_ok, offs_hm, hm_ok)
    # the forward, recomputed
    mean, dm, m2, rstd, xx = shifted_row_stats(s1, s2, shift, d, ln_eps)
    s_oca, p, pc, xc, dot, pgc, pgp, coef, rstd2 = _forward_rows(xa, xcc, mean, dm, m2, rstd, xx, cola, cbar, gc,
                                                                 gate, d, m_ok, ln_eps, orth_eps, ORTH, BLOCK_N, PREC)
    valid = row_ok
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * N + offs_n, mask=row_ok, other=0) != 0)
    pq, dsq, mean_g, mean_gx = _query_grads(xk, xdo, dm, ksum, dosum, rstd2, coef, gate, p, ck, cdo, lse,
                                      qdelta, valid, hm_ok, d, PREC)
    # G C^T and <G, x>: all the OCA backward needs of G per row
    oc, do_x = _g_terms(dcc, dsum, dox, xcc, xk, xdo, cbar, ck, cdo, p, pgc, pq, dsq, rstd2, coef, gate, m2, dm,
                        mean_g, mean_gx, d, ORTH, BLOCK_N)
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    # the OCA backward with upstream G (kernels/oca.py's rows kernel)
    if ORTH == ORTH_SOFT:
        pg = pgc + (d * pc)[:, None] * cbar[None, :]  # P C C^T
        dd = pgp + d * pc * pc  # |Delta|^2 (the centred and the constant part are orthogonal)
        gcs = tl.load(DCOS2 + b * sdb + offs_n * sdn, mask=row_ok, other=0.0).to(tl.float32)
    else:
        pg = pgc
        dd = zero
        gcs = zero
    dg, alpha, beta, ds, c_do, c_dl, c_x = oca_row_grads(p, oc, xc, pg, dot, dd, xx, do_x, gcs, gate,
                                                         ORTH == ORTH_HARD, ORTH == ORTH_SOFT)
    m1 = tl.sum(ds * cola[None, :], 1) / d
    m2s = tl.sum(ds * s_oca, 1) / d
    tl.store(DG_PART + b * tl.num_programs(0) + pid, tl.sum(tl.where(row_ok, dg, 0.0), 0))
    _store_rows(P_S, DS_S, DSQ_S, PQ_S, ROWS + b * N_ROWS * N + offs_n, b, N, M, HM, offs_n, row_ok, offs_m, m_ok,
                offs_hm, hm_ok, p, ds * rstd[:, None], dsq, pq, mean, rstd2, coef, pc, mean_g, mean_gx, 1.0 + c_do,
                c_x, rstd * rstd * m2s, -rstd * m1, c_dl, alpha, beta, ROUND_BY_HAND)


@triton.jit
def _load_rows(rows, N, n_ok):
    """The row scalars the rows kernel stored (R_MEAN .. R_ALPHA) for the tokens at `rows`."""
    mean = tl.load(rows + R_MEAN * N, mask=n_ok, other=0.0)
    rstd2 = tl.load(rows + R_RSTD2 * N, mask=n_ok, other=0.0)
    coef = tl.load(rows + R_COEF * N, mask=n_ok, other=0.0)
    pc = tl.load(rows + R_PC * N, mask=n_ok, other=0.0)
    mean_g = tl.load(rows + R_MEAN_G * N, mask=n_ok, other=0.0)
    mean_gx = tl.load(rows + R_MEAN_GX * N, mask=n_ok, other=0.0)
    k_do = tl.load(rows + R_KDO * N, mask=n_ok, other=0.0)
    k_x = tl.load(rows + R_KX * N, mask=n_ok, other=0.0)
    q = tl.load(rows + R_Q * N, mask=n_ok, other=0.0)
    k_0 = tl.load(rows + R_K0 * N, mask=n_ok, other=0.0)
    k_dl = tl.load(rows + R_KDL * N, mask=n_ok, other=0.0)
    alpha = tl.load(rows + R_ALPHA * N, mask=n_ok, other=0.0)
    return mean, rstd2, coef, pc, mean_g, mean_gx, k_do, k_x, q, k_0, k_dl, alpha


@triton.jit
def _load_scratch(P_S, DS_S, DSQ_S, PQ_S, b, N, M, HM, offs_n, n_ok, offs_m, m_ok, offs_hm, hm_ok):
    """The rows kernel's P, rstd dS (BLOCK_N, BLOCK_M), dS_q and Pq (BLOCK_N, BLOCK_HM) for the tokens offs_n."""
    p = load_tile(P_S + b * N * M, M, 1, offs_n, offs_m, n_ok, m_ok)
    dsr = load_tile(DS_S + b * N * M, M, 1, offs_n, offs_m, n_ok, m_ok)
    dsq = load_tile(DSQ_S + b * N * HM, HM, 1, offs_n, offs_hm, n_ok, hm_ok)
    pq = load_tile(PQ_S + b * N * HM, HM, 1, offs_n, offs_hm, n_ok, hm_ok)
    return p, dsr, dsq, pq


@triton.jit
def _store_partials(DA_PART, DC_PART, DK_PART, OB_PART, DCB_PART, part, pid_d, d, M, HM, offs_d, d_ok, offs_m, m_ok,
                    offs_hm, hm_ok, acc_a, acc_ct, acc_k, acc_o, ROUND_BY_HAND: tl.constexpr):
    """A program's four token reductions, once, into its own slot of the partial buffers (dA's and
    dKABS's in the gradient's own dtype when a program's partial is the whole gradient)."""
    dm_ok = d_ok[:, None] & m_ok[None, :]
    dh_ok = d_ok[:, None] & hm_ok[None, :]
    # every partial (..., M or HM, d): A and KABS are transposed views of (M, d) and (HM, d)
    # products, so their gradients come back in the layout autograd passes on without a copy
    tl.store(DA_PART + part * M * d + offs_m[None, :] * d + offs_d[:, None],
             cast_out(acc_a, DA_PART.dtype.element_ty, ROUND_BY_HAND), mask=dm_ok)
    tl.store(DC_PART + part * M * d + offs_m[None, :] * d + offs_d[:, None], acc_ct, mask=dm_ok)
    tl.store(DK_PART + part * HM * d + offs_hm[None, :] * d + offs_d[:, None],
             cast_out(acc_k, DK_PART.dtype.element_ty, ROUND_BY_HAND), mask=dh_ok)
    tl.store(OB_PART + part * HM * d + offs_hm[None, :] * d + offs_d[:, None], acc_o, mask=dh_ok)
    # the chunk's row sums of dC, cbar's gradient, (B, splits, d chunks, M): summed over d by
    # torch they would be a second read of dC
    tl.store(DCB_PART + (part * tl.num_programs(0) + pid_d) * M + offs_m, tl.sum(acc_ct, 0), mask=m_ok)


@triton.jit
def layer_bwd_cols_kernel(
    X, sxb, sxn, sxd,
    DOUT, sgb, sgn, sgd,
    A, sab, sad, sam,
    CC, scb, scm, scd,
    KABS, skb, skd, skh,
    DO, GATE,
    P_S, DS_S, DSQ_S, PQ_S, ROWS,
    DX, DA_PART, DC_PART, DK_PART, OB_PART, DCB_PART,
    N, d, M, HM, n_tiles,
    ORTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_HM: tl.constexpr, PREC: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
):
    """Backward, per column chunk: G, dx, and the token reductions dA = LN(x)^T dS,
    dC = P^T dDelta, dKABS = LN(x_out)^T dS_q and LN(x_out)^T Pq (for dW_v).

    Grid (d chunks, token splits, B): a program owns BLOCK_DC columns of one sample, reads that
    chunk of A^T, Cc, KABS^T and DO once, as the right operands of the tile products (on sm_90
    they stay in shared memory, which is what lets the chunk be wide), and walks the token
    tiles (BLOCK_N x BLOCK_DC) of its split:
      P Cc, Delta = P Cc + P.cbar, LN(x_out) = rstd2 (a (x - mean) + g P Cc),
      G = dout + rstd2 (dS_q KABS^T + Pq DO - mean(dxn2) - LN(x_out) mean(dxn2 LN(x_out))),
      dx = (rstd dS) A^T + k_do G + k_x x - q (x - mean) + k_0 + k_dl Delta,  dDelta = g G + alpha x + beta Delta,
    stores dx, and accumulates the four (BLOCK_DC x M or HM) float32 partials in registers, stored
    once into the program's own slot (summed with torch: deterministic, no atomics).
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
    offs_m = tl.arange(0, BLOCK_M)
    offs_hm = tl.arange(0, BLOCK_HM)
    d_ok = offs_d < d
    m_ok = offs_m < M
    hm_ok = offs_hm < HM
    gate = tl.load(GATE).to(tl.float32)
    # the chunk's sample matrices, each the right operand (K x BLOCK_DC) of a product inside the
    # loop, read once per program
    at_c = load_tile(A + b * sab, sam, sad, offs_m, offs_d, m_ok, d_ok)  # A^T chunk (BLOCK_M, BLOCK_DC)
    cc_c = load_tile(CC + b * scb, scm, scd, offs_m, offs_d, m_ok, d_ok)
    kt_c = load_tile(KABS + b * skb, skh, skd, offs_hm, offs_d, hm_ok, d_ok)  # KABS^T chunk (BLOCK_HM, BLOCK_DC)
    do_c = load_tile(DO + b * HM * d, d, 1, offs_hm, offs_d, hm_ok, d_ok)
    acc_a = tl.zeros([BLOCK_DC, BLOCK_M], dtype=tl.float32)
    acc_ct = tl.zeros([BLOCK_DC, BLOCK_M], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_DC, BLOCK_HM], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_DC, BLOCK_HM], dtype=tl.float32)
    for t in range(pid_s, n_tiles, n_splits):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        tmask = n_ok[:, None] & d_ok[None, :]
        xt = load_tile(X + b * sxb, sxn, sxd, offs_n, offs_d, n_ok, d_ok)  # (BLOCK_N, BLOCK_DC)
        gt = load_tile(DOUT + b * sgb, sgn, sgd, offs_n, offs_d, n_ok, d_ok)
        p, dsr, dsq, pq = _load_scratch(P_S, DS_S, DSQ_S, PQ_S, b, N, M, HM, offs_n, n_ok, offs_m, m_ok, offs_hm, hm_ok)
        rows = ROWS + b * N_ROWS * N + offs_n
        mean, rstd2, coef, pc, mean_g, mean_gx, k_do, k_x, q, k_0, k_dl, alpha = _load_rows(rows, N, n_ok)
        xm = tl.where(tmask, xt - mean[:, None], 0.0)
        pcc = tl.dot(p, cc_c, input_precision=PREC)  # P Cc
        xn2 = tl.where(tmask, rstd2[:, None] * (coef[:, None] * xm + gate * pcc), 0.0)
        # dA's share now, so that x - mean is not held through the products below (held, it
        # spilled 8 bytes at 128 columns and 224 registers, triton 3.8; dx recomputes it)
        acc_a = tl.dot(tl.trans(xm), dsr, acc_a, input_precision=PREC)
        dxn2 = tl.dot(dsq, kt_c, input_precision=PREC)
        dxn2 = tl.dot(pq, do_c, dxn2, input_precision=PREC)
        g = gt + rstd2[:, None] * (dxn2 - mean_g[:, None] - xn2 * mean_gx[:, None])
        delta = pcc + pc[:, None]
        dx = tl.dot(dsr, at_c, input_precision=PREC)
        dx += (k_do[:, None] * g + k_x[:, None] * xt - q[:, None] * (xt - mean[:, None]) + k_0[:, None]
               + k_dl[:, None] * delta)
        ddelta = gate * g + alpha[:, None] * xt
        if ORTH == ORTH_SOFT:
            beta = tl.load(rows + R_BETA * N, mask=n_ok, other=0.0)
            ddelta += beta[:, None] * delta
        ddelta = tl.where(tmask, ddelta, 0.0)
        tl.store(DX + (b * N + offs_n[:, None]) * d + offs_d[None, :],
                 cast_out(dx, DX.dtype.element_ty, ROUND_BY_HAND), mask=tmask)
        acc_ct = tl.dot(tl.trans(ddelta), p, acc_ct, input_precision=PREC)
        acc_k = tl.dot(tl.trans(xn2), dsq, acc_k, input_precision=PREC)
        acc_o = tl.dot(tl.trans(xn2), pq, acc_o, input_precision=PREC)
    _store_partials(DA_PART, DC_PART, DK_PART, OB_PART, DCB_PART, b * n_splits + pid_s, pid_d, d, M, HM, offs_d,
                    d_ok, offs_m, m_ok, offs_hm, hm_ok, acc_a, acc_ct, acc_k, acc_o, ROUND_BY_HAND)
