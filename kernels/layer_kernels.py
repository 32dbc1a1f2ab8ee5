"""Triton kernels of the fused NEARL layer's forward (SPEC 3.1): OCA + the USEformer query attention.

Two kernels. `layer_fwd_kernel`, grid (token tiles, B): a program owns one tile of one sample and
makes two passes over its columns, every product and statistic first, then the write of x_out. It
keeps the first pass's products and row terms (for the attention kernel and the backward).
`layer_attn_kernel`, grid (splits, B): the online softmax of the query attention over a contiguous
range of a sample's tiles (a "split"), from those kept products alone; several splits per sample
keep a small batch busy, and their partial softmax states are combined afterwards in torch, as
split-KV decoding does. Apart, neither holds the other's registers: the attention state (H*M x D)
beside the first pass's accumulators spilled once the products were kept.

The token width d is walked in chunks of BLOCK_C columns, and the second pass re-reads the tile
backwards, from the chunk the first ended on, so that each re-read comes as soon after the first
read as it can (L1/L2): the products need (tile x d) @ (d x D) whose right operand cannot sit in
shared memory whole at d = 768, and chunking keeps registers bounded for any d. The backward is
in `layer_bwd_kernels.py`.

Keys are absorbed into the queries: KABS[b] = W_k (blockdiag_h Qh[b])^T / sqrt(dh) is (d, H*M), so
the scores of all heads come from one product, LN(x_out) @ KABS[b]. Values are formed per tile,
V = LN(x_out) @ W_v (BLOCK_N x D), so the running accumulator is (H*M, D), not (H*M, d). Row
(h, m) of the accumulator holds P_h @ V for every column; the torch side keeps head h's columns.
"""
import triton
import triton.language as tl

from .casting import cast_out
from .tiles import ORTH_HARD, ORTH_SOFT, first_chunk_mean, last_chunk_start, load_tile, shifted_row_stats

# Row terms the forward keeps per token, (B, N_STATS, N) float32: the sums of the shifted row and
# of its squares, the shift (the backward's too), x's coefficient in x_out and x_out's rstd.
S_SUM, S_SUMSQ, S_SHIFT, S_COEF, S_RSTD2 = (tl.constexpr(i) for i in range(5))
N_STATS = tl.constexpr(5)


@triton.jit
def _load_chunk(rows_ptr, stride, cols, row_ok, col_ok):
    ptrs = rows_ptr[:, None] + cols[None, :] * stride
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pass_1(x_rows, sxd, row_ok, shift, d, a_base, sad, sam, cc_base, scd, scm, kabs_base, skd, skh, WV, swd, swe,
            offs_c, offs_m, m_ok, offs_hm, hm_ok, offs_dq, dq_ok,
            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HM: tl.constexpr,
            BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Pass 1 over a tile's columns: the sums of the shifted tokens and their squares, and their
    products with A, Cc^T, KABS and W_v."""
    s1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    xa = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xcc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xk = tl.zeros([BLOCK_N, BLOCK_HM], dtype=tl.float32)
    xv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_C):
        cols = c0 + offs_c
        col_ok = cols < d
        xs = tl.where(col_ok[None, :], _load_chunk(x_rows, sxd, cols, row_ok, col_ok) - shift[:, None], 0.0)
        s1 += tl.sum(xs, 1)
        s2 += tl.sum(xs * xs, 1)
        a_c = load_tile(a_base, sad, sam, cols, offs_m, col_ok, m_ok)
        cct_c = load_tile(cc_base, scd, scm, cols, offs_m, col_ok, m_ok)  # Cc^T chunk
        k_c = load_tile(kabs_base, skd, skh, cols, offs_hm, col_ok, hm_ok)
        v_c = load_tile(WV, swd, swe, cols, offs_dq, col_ok, dq_ok)
        xa = tl.dot(xs, a_c, xa, input_precision=PREC)
        xcc = tl.dot(xs, cct_c, xcc, input_precision=PREC)
        xk = tl.dot(xs, k_c, xk, input_precision=PREC)
        xv = tl.dot(xs, v_c, xv, input_precision=PREC)
    return s1, s2, xa, xcc, xk, xv


@triton.jit
def _oca_rows(xa, xcc, mean, dm, m2, rstd, xx, cola, cbar, gc, gate, d, m_ok, cos2_ptrs, row_ok,
              ln_eps, orth_eps, cos2_eps, ORTH: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """OCA from the products: the probabilities P, P.cbar, x's coefficient in x_out (1 - g k for the
    hard projection, else 1) and x_out's rstd; with orth="soft" it stores cos^2."""
    scores = rstd[:, None] * (xa - dm[:, None] * cola[None, :])
    scores = tl.where(m_ok[None, :], scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    pc = tl.sum(p * cbar[None, :], 1)  # P.cbar
    # rows of Cc sum to 0, so x Cc^T = (x - mean) Cc^T = (x - shift) Cc^T = xcc
    dot = tl.sum(p * xcc, 1) + d * mean * pc  # <Delta, x> = P.(x Cc^T) + sum(x) P.cbar
    pgp = tl.sum(p * tl.dot(p, gc, input_precision=PREC), 1)  # |P Cc|^2
    if ORTH == ORTH_HARD:
        coef = 1.0 - gate * dot / (xx + orth_eps)
    else:
        coef = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if ORTH == ORTH_SOFT:
        dd = pgp + d * pc * pc  # |Delta|^2 (the centred and the constant part are orthogonal)
        tl.store(cos2_ptrs, dot * dot / (dd * xx + cos2_eps), mask=row_ok)
    var2 = coef * coef * m2 + 2.0 * coef * gate * tl.sum(p * xcc, 1) + gate * gate * pgp
    rstd2 = 1.0 / tl.sqrt(tl.maximum(var2, 0.0) / d + ln_eps)
    return p, pc, coef, rstd2


@triton.jit
def _pass_2(x_rows, sxd, out_rows, row_ok, d, p, pc, coef, gate, cc_base, scm, scd, offs_c, offs_m, m_ok,
            BLOCK_C: tl.constexpr, PREC: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """Pass 2: x_out = coef x + g (P Cc + P.cbar), written chunk by chunk, backwards: from the chunk
    pass 1 ended on towards the ones it read longest ago, so that each re-read comes as soon after
    the first read as it can (L1/L2; forwards, every chunk would come a whole tile later)."""
    last = last_chunk_start(d, BLOCK_C)
    for i in range(0, tl.cdiv(d, BLOCK_C)):
        cols = last - i * BLOCK_C + offs_c
        col_ok = cols < d
        xc = _load_chunk(x_rows, sxd, cols, row_ok, col_ok)
        delta = tl.dot(p, load_tile(cc_base, scm, scd, offs_m, cols, m_ok, col_ok), input_precision=PREC)
        oc = coef[:, None] * xc + gate * (delta + pc[:, None])
        tl.store(out_rows[:, None] + cols[None, :], cast_out(oc, out_rows.dtype.element_ty, ROUND_BY_HAND),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sample_terms(CK, CV, KSUM, VSUM, b, M, HM, D, offs_m, m_ok, offs_hm, hm_ok, offs_dq, dq_ok):
    """Sample b's Cc KABS (M, HM), Cc W_v (M, D) and the column sums of KABS and W_v."""
    ck = tl.load(CK + (b * M + offs_m[:, None]) * HM + offs_hm[None, :], mask=m_ok[:, None] & hm_ok[None, :],
                 other=0.0)
    cv = tl.load(CV + (b * M + offs_m[:, None]) * D + offs_dq[None, :], mask=m_ok[:, None] & dq_ok[None, :],
                 other=0.0)
    ksum = tl.load(KSUM + b * HM + offs_hm, mask=hm_ok, other=0.0)
    vsum = tl.load(VSUM + offs_dq, mask=dq_ok, other=0.0)
    return ck, cv, ksum, vsum


@triton.jit
def _attend(xk, xv, dm, ksum, vsum, rstd2, coef, gate, p, ck, cv, valid, m_run, l_run, acc, PREC: tl.constexpr):
    """The tile's step of the query attention on LN(x_out), from the products: the online-softmax
    state (running max, running sum, unnormalised accumulator) updated."""
    s = rstd2[:, None] * (coef[:, None] * (xk - dm[:, None] * ksum[None, :])
                          + gate * tl.dot(p, ck, input_precision=PREC))
    s = tl.where(valid[:, None], s, float("-inf"))
    m_new = tl.maximum(m_run, tl.max(s, 0))
    alpha = tl.exp(m_run - m_new)
    pq = tl.exp(s - m_new[None, :])
    l_run = l_run * alpha + tl.sum(pq, 0)
    # the values only now: formed earlier they would be live through the softmax update
    v = rstd2[:, None] * (coef[:, None] * (xv - dm[:, None] * vsum[None, :])
                          + gate * tl.dot(p, cv, input_precision=PREC))
    return m_new, l_run, acc * alpha[:, None] + tl.dot(tl.trans(pq), v, input_precision=PREC)


@triton.jit
def _save_products(prods, stats, N, rows, row_ok, M, HM, D, offs_m, m_ok, offs_hm, hm_ok, offs_dq, dq_ok,
                   s1, s2, shift, xa, xcc, xk, xv):
    """Pass 1's results, kept for the attention kernel and the backward (which would otherwise redo
    pass 1's products, re-reading A, Cc^T, KABS and W_v for every tile): one row of 2 M + H*M + D
    float32 per token, [xa | xcc | xk | xv] at `prods` (the sample's first row), and the row sums
    s1, s2 and the shift at `stats` ((N_STATS, N) per sample). Offsets are int32 from one base,
    which takes fewer registers than tiles of 64-bit pointers."""
    row = rows[:, None] * (2 * M + HM + D)
    nm = row_ok[:, None] & m_ok[None, :]
    tl.store(prods + row + offs_m[None, :], xa, mask=nm)
    tl.store(prods + row + M + offs_m[None, :], xcc, mask=nm)
    tl.store(prods + row + 2 * M + offs_hm[None, :], xk, mask=row_ok[:, None] & hm_ok[None, :])
    tl.store(prods + row + 2 * M + HM + offs_dq[None, :], xv, mask=row_ok[:, None] & dq_ok[None, :])
    tl.store(stats + S_SUM * N + rows, s1, mask=row_ok)
    tl.store(stats + S_SUMSQ * N + rows, s2, mask=row_ok)
    tl.store(stats + S_SHIFT * N + rows, shift, mask=row_ok)


@triton.jit
def layer_fwd_kernel(
    X, sxb, sxn, sxd,
    A, sab, sad, sam,
    CC, scb, scm, scd,
    CBAR, GATE,
    KABS, skb, skd, skh,
    WV, swd, swe,
    GC, COLA,
    OUT, COS2, PRODS, STATS, P_S,
    N, d, M, HM, D,
    ln_eps, orth_eps, cos2_eps,
    ORTH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_HM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
):
    """x_out (written once) for one token tile, and what the attention kernel and the backward
    need of it: pass 1's products and row sums (PRODS, STATS: `_save_products`), OCA's P (P_S)
    and the row terms coef, rstd2 (STATS).

    Two passes over the tile's columns. Pass 1 multiplies the (shifted) tokens with every matrix
    the layer needs, A, Cc^T, KABS and W_v, and sums the LayerNorm statistics; everything else
    follows from M-, HM- and D-sized terms (C = Cc + cbar 1^T with centred rows Cc, a the
    coefficient of x in x_out, 1 - g k for the hard projection, else 1):
      S      = rstd (x - mean) A
      x_out  = a x + g (P Cc + P.cbar)                (pass 2 writes it)
      x_out - mean2 = a (x - mean) + g P Cc,  mean2 = a mean + g P.cbar
      d var2 = a^2 m2 + 2 a g P.((x - mean) Cc^T) + g^2 P (Cc Cc^T) P^T
      LN(x_out) [KABS | W_v] = rstd2 (a (x - mean) [KABS | W_v] + g P (Cc [KABS | W_v]))
    so LN(x_out) is never formed (the attention kernel takes the last line from the kept terms).
    The products use x minus its first chunk's mean (a shift of about one standard deviation from
    the row mean), so (x - mean) M = (x - s) M - (mean - s) 1^T M does not cancel when a row's mean
    is large against its spread (residual streams).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    offs_m = tl.arange(0, BLOCK_M)
    offs_hm = tl.arange(0, BLOCK_HM)
    offs_dq = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    hm_ok = offs_hm < HM
    dq_ok = offs_dq < D
    gate = tl.load(GATE).to(tl.float32)
    cc_base = CC + b * scb
    rows = tile * BLOCK_N + offs_n
    row_ok = rows < N
    x_rows = X + b * sxb + rows.to(tl.int64) * sxn
    # the shift: each row's mean over the first chunk
    shift = first_chunk_mean(_load_chunk(x_rows, sxd, offs_c, row_ok, offs_c < d), d, BLOCK_C)
    s1, s2, xa, xcc, xk, xv = _pass_1(x_rows, sxd, row_ok, shift, d, A + b * sab, sad, sam, cc_base, scd, scm,
                                      KABS + b * skb, skd, skh, WV, swd, swe, offs_c, offs_m, m_ok, offs_hm, hm_ok,
                                      offs_dq, dq_ok, BLOCK_N, BLOCK_C, BLOCK_M, BLOCK_HM, BLOCK_D, PREC)
    stats = STATS + b * N_STATS * N
    _save_products(PRODS + b * N * (2 * M + HM + D), stats, N, rows, row_ok, M, HM, D, offs_m, m_ok,
                   offs_hm, hm_ok, offs_dq, dq_ok, s1, s2, shift, xa, xcc, xk, xv)
    # the per-sample terms, loaded here rather than held across the column loop (registers)
    cbar = tl.load(CBAR + b * M + offs_m, mask=m_ok, other=0.0)
    cola = tl.load(COLA + b * M + offs_m, mask=m_ok, other=0.0)
    gc = tl.load(GC + (b * M + offs_m[:, None]) * M + offs_m[None, :], mask=m_ok[:, None] & m_ok[None, :],
                 other=0.0)
    mean, dm, m2, rstd, xx = shifted_row_stats(s1, s2, shift, d, ln_eps)
    p, pc, coef, rstd2 = _oca_rows(xa, xcc, mean, dm, m2, rstd, xx, cola, cbar, gc, gate, d, m_ok,
                                   COS2 + b * N + rows, row_ok, ln_eps, orth_eps, cos2_eps, ORTH, BLOCK_N, PREC)
    tl.store(stats + S_COEF * N + rows, coef, mask=row_ok)
    tl.store(stats + S_RSTD2 * N + rows, rstd2, mask=row_ok)
    tl.store(P_S + b * N * M + rows[:, None] * M + offs_m[None, :], p, mask=row_ok[:, None] & m_ok[None, :])
    # pass 2: x_out, the only write of a (B, N, d) tensor
    _pass_2(x_rows, sxd, OUT + (b * N + rows.to(tl.int64)) * d, row_ok, d, p, pc, coef, gate, cc_base, scm, scd,
            offs_c, offs_m, m_ok, BLOCK_C, PREC, ROUND_BY_HAND)


@triton.jit
def layer_attn_kernel(
    PRODS, STATS, P_S, GATE,
    CK, CV, KSUM, VSUM, MASK,
    M_PART, L_PART, ACC_PART,
    N, d, M, HM, D, tiles_per_split, n_splits,
    HAS_MASK: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    """The query attention over LN(x_out) for one split of a sample's tiles, from what
    `layer_fwd_kernel` kept (no (B, N, d) tensor is read): per (sample, split), the online-softmax
    state, running max (HM,), running sum (HM,), unnormalised accumulator (HM, D). With dm = mean -
    s = s1 / d:
      S_q = rstd2 (a ((x - s) KABS - dm 1^T KABS) + g P (Cc KABS)),  V likewise with W_v.
    FINAL (one split: the state is the sample's whole): the result itself, the normalised
    accumulator U_all at ACC_PART and the log-sum-exp at M_PART (L_PART untouched), so that no
    torch op re-reads the (HM, D) state to divide it.
    """
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_hm = tl.arange(0, BLOCK_HM)
    offs_dq = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    hm_ok = offs_hm < HM
    dq_ok = offs_dq < D
    gate = tl.load(GATE).to(tl.float32)
    ck, cv, ksum, vsum = _sample_terms(CK, CV, KSUM, VSUM, b, M, HM, D, offs_m, m_ok, offs_hm, hm_ok, offs_dq, dq_ok)
    stats = STATS + b * N_STATS * N
    width = 2 * M + HM + D
    m_run = tl.full([BLOCK_HM], -1e30, dtype=tl.float32)  # finite: a fully masked tile adds exp(-inf) = 0
    l_run = tl.zeros([BLOCK_HM], dtype=tl.float32)
    acc = tl.zeros([BLOCK_HM, BLOCK_D], dtype=tl.float32)
    tile_end = tl.minimum((split + 1) * tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(split * tiles_per_split, tile_end):
        rows = tile * BLOCK_N + offs_n
        valid = rows < N
        if HAS_MASK:  # masked tokens are not read: whatever they hold (NaN) never reaches the queries
            valid = valid & (tl.load(MASK + b * N + rows, mask=valid, other=0) != 0)
        prods = PRODS + (b * N + rows[:, None]) * width
        xk = tl.load(prods + 2 * M + offs_hm[None, :], mask=valid[:, None] & hm_ok[None, :], other=0.0)
        xv = tl.load(prods + 2 * M + HM + offs_dq[None, :], mask=valid[:, None] & dq_ok[None, :], other=0.0)
        p = tl.load(P_S + (b * N + rows[:, None]) * M + offs_m[None, :], mask=valid[:, None] & m_ok[None, :],
                    other=0.0)
        dm = tl.load(stats + S_SUM * N + rows, mask=valid, other=0.0) / d
        coef = tl.load(stats + S_COEF * N + rows, mask=valid, other=0.0)
        rstd2 = tl.load(stats + S_RSTD2 * N + rows, mask=valid, other=0.0)
        m_run, l_run, acc = _attend(xk, xv, dm, ksum, vsum, rstd2, coef, gate, p, ck, cv, valid, m_run, l_run, acc,
                                    PREC)
    state = (b * n_splits + split) * HM
    if FINAL:
        tl.store(M_PART + state + offs_hm, m_run + tl.log(l_run), mask=hm_ok)
        acc = acc / l_run[:, None]
    else:
        tl.store(M_PART + state + offs_hm, m_run, mask=hm_ok)
        tl.store(L_PART + state + offs_hm, l_run, mask=hm_ok)
    tl.store(ACC_PART + (state + offs_hm[:, None]) * D + offs_dq[None, :], acc, mask=hm_ok[:, None] & dq_ok[None, :])
