"""The fused NEARL layer: the kernels' token part (`nearl_kernels.layer`) composed with the
per-sample query math of the reference (`nearl.ops.reference`), which autograd differentiates.

`layer_operands` forms everything the kernels take besides x and the mask from the queries and the
weights; `nearl_layer` runs them, or `nearl.ops.split_layer` (the OCA kernels, then the query update in
torch) where `nearl.ops.layer_path` finds it faster or the query bank too large for the fused kernels.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from nearl_kernels import layer as L
from nearl_kernels import policy

from nearl.ops import layer_path, query_math, reference
from nearl.ops.split_layer import split_layer


def layer_operands(qf: torch.Tensor, p: Mapping[str, torch.Tensor], heads: int,
                   dtype: torch.dtype = torch.float32) -> L.LayerOperands:
    """Everything the fused kernels take besides x and the mask (`kernels.layer.LayerOperands`).

    For bf16 x (`dtype`; `policy.operand_dtype`), A, KABS and W_v are formed with bf16 operands and
    held in bf16 (SPEC 7): every token tile re-reads them, so they are most of the forward's requests (2.1 of
    its 11.6 passes over x at ViT-B/16). Cc stays float32: the kernels take x Cc^T = (x - s) Cc^T
    because Cc's rows sum to 0, which rounding would break by s x 2^-9 (s, the row's shift, is
    the residual stream's mean); A, KABS and W_v enter only through (x - s) products whose shift
    terms use differences of means (dm), small by construction.

    A as in `query_math.oca_factors`; C = Vq W_up as its centred rows cc = Vq (W_up - rowmean) and
    their means cbar = Vq rowmean(W_up) (centring the weight centres C: a weight-sized op). The
    products of Cc with KABS, W_v and itself, and the column sums, factor through the weights, so
    none of them reads a batch-sized tensor: Cc KABS = Vq (W_upc W_k) Qb^T, Cc W_v = Vq (W_upc W_v),
    Cc Cc^T = Vq (W_upc W_upc^T) Vq^T, 1^T A = Kq (1^T W_down)^T / sqrt(r), 1^T KABS = Qb (1^T W_k)^T
    (those through the block queries Qb per head, from Qh: `head_products`).
    They are formed without gradient (aux): the backward differentiates through a, cc, kabs and
    w_v."""
    r = p["w_down"].shape[1]
    held = policy.operand_dtype(dtype)
    low = (lambda t: t.to(held))  # noqa: E731
    # A^T = Kq (W_down / sqrt(r))^T: one (B*M, r) x (r, d) product writes it, scaled on the weight
    w_down = p["w_down"] / math.sqrt(r)
    kq = qf @ p["w_ok"]
    a = (low(kq) @ low(w_down).t()).transpose(1, 2)
    up_mean = p["w_up"].mean(dim=1)
    w_upc = p["w_up"] - up_mean[:, None]
    vq = qf @ p["w_ov"]
    qh = query_math.layer_norm_q(qf, p) @ p["w_q"]
    # the block queries (B, H*M, D) only for KABS, in its dtype; what else reads them reads Qh
    kabs = L.absorbed_keys(L.block_queries(low(qh), heads), low(p["w_k"]))
    with torch.no_grad():
        w_k = p["w_k"] / math.sqrt(p["w_k"].shape[1] // heads)  # the block queries' 1/sqrt(dh), on the weight
        aux = L.SmallProducts(cc_kabs=L.head_products(vq @ (w_upc @ w_k), qh, heads),
                              cc_wv=vq @ (w_upc @ p["w_v"]),
                              cc_cc=vq @ (w_upc @ w_upc.t()) @ vq.transpose(1, 2),
                              a_colsum=kq @ w_down.sum(0),
                              kabs_colsum=L.head_products(w_k.sum(0).expand(qh.shape[0], 1, -1), qh, heads)[:, 0],
                              wv_colsum=p["w_v"].sum(0))
    return L.LayerOperands(a=a, cc=vq @ w_upc, cbar=vq @ up_mean, gate=p["gate"], kabs=kabs, w_v=low(p["w_v"]),
                           aux=aux)




def nearl_layer(x: torch.Tensor, q: torch.Tensor, params: Mapping[str, torch.Tensor], *,
                mask: Optional[torch.Tensor] = None, orth: str = "hard", heads: int = 4,
                path: Optional[str] = None):
    """NEARL layer on the kernels. x (B, N, d), q (B, M, D) or (M, D), mask (B, N) bool or None.

    Returns (x_out (B, N, d) in x's dtype, q_out (B, M, D) in q's dtype), plus cos2 (B, N) float32
    with orth="soft". path: "fused" (the layer kernels), "split" (`nearl.ops.split_layer`: the OCA
    kernels, then the query update in torch) or None (`nearl.ops.layer_path` chooses per shape and
    logs it once). Arguments are validated by `nearl.ops.nearl_layer`; float64 inputs (gradcheck)
    run the reference.
    """
    if any(t.dtype == torch.float64 for t in (x, q)):
        return reference.nearl_layer(x, q, params, mask=mask, orth=orth, heads=heads)  # gradcheck runs here
    L.check_kernel_limits(x, q)
    B = x.shape[0]
    path = _path(x, q, params, heads, path)
    with torch.autocast(x.device.type, enabled=False):
        p = {k: (v.float() if torch.is_tensor(v) else v) for k, v in params.items()}
        qf = q.float()
        if qf.dim() == 2:
            qf = qf.unsqueeze(0).expand(B, -1, -1)
        if path == "split":
            x_out, q_out, cos2 = split_layer(x, qf, p, mask, orth, heads)
        else:
            x_out, cos2, u_all, _ = L.layer_tokens(x, layer_operands(qf, p, heads, x.dtype), mask, orth)
            q_out = query_math.query_tail(qf, L.head_diagonal(u_all, heads), p)
    q_out = q_out.to(q.dtype)
    return (x_out, q_out, cos2) if orth == "soft" else (x_out, q_out)


def _path(x, q, params, heads: int, path: Optional[str]) -> str:
    """The path asked for (checked), or the one `layer_path` chooses (said once)."""
    hm, D, M = heads * q.shape[-2], q.shape[-1], q.shape[-2]
    if path is not None:
        if path not in layer_path.PATHS:
            raise ValueError(f"path must be one of {layer_path.PATHS} or None, got {path!r}")
        if path == "fused" and not L.fused_supported(hm, D, x.dtype, x.device, M):
            raise ValueError(f"path='fused': the fused kernels cannot take {hm} query rows of width {D} in "
                             f"{x.dtype} on {x.device}; use path='split' or None")
        if path == "fused" and not L.fused_takes_width(x.shape[2]):
            raise ValueError(L.width_error(x) + "; use path='split' or None")
        return path
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, q, *params.values()) if torch.is_tensor(t))
    return layer_path.decide(tuple(x.shape), x.dtype, x.device, hm, D, M, grad)
