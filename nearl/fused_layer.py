"""The fused NEARL layer: the kernels' token part (`nearl_kernels.layer`) composed with the
per-sample query math of the reference (`nearl.reference`), which autograd differentiates.

`layer_operands` forms everything the kernels take besides x and the mask from the queries and the
weights; `nearl_layer` runs them, and query banks too large for the fused kernels take
`_split_layer` (the fused OCA kernels, then the query update in torch).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from nearl_kernels import layer as L
from nearl_kernels.oca import oca

from . import reference


def layer_operands(qf: torch.Tensor, p: Mapping[str, torch.Tensor], heads: int):
    """Everything the fused kernels take besides x and the mask: (a, cc, cbar, gate, kabs, w_v, aux).

    A as in `reference.oca_factors`; C = Vq W_up as its centred rows cc = Vq (W_up - rowmean) and
    their means cbar = Vq rowmean(W_up) (centring the weight centres C: a weight-sized op). The
    products of Cc with KABS, W_v and itself, and the column sums, factor through the weights, so
    none of them reads a batch-sized tensor: Cc KABS = Vq (W_upc W_k) Qb^T, Cc W_v = Vq (W_upc W_v),
    Cc Cc^T = Vq (W_upc W_upc^T) Vq^T, 1^T A = Kq (1^T W_down)^T / sqrt(r), 1^T KABS = Qb (1^T W_k)^T.
    They are formed without gradient (aux): the backward differentiates through a, cc, kabs and
    w_v."""
    r = p["w_down"].shape[1]
    # A^T = Kq (W_down / sqrt(r))^T: one (B*M, r) x (r, d) product writes it, scaled on the weight
    w_down = p["w_down"] / math.sqrt(r)
    kq = qf @ p["w_ok"]
    a = (kq @ w_down.t()).transpose(1, 2)
    up_mean = p["w_up"].mean(dim=1)
    w_upc = p["w_up"] - up_mean[:, None]
    vq = qf @ p["w_ov"]
    qh = reference.layer_norm_q(qf, p) @ p["w_q"]
    qb = L.block_queries(qh, heads)
    kabs = L.absorbed_keys(qb, p["w_k"])
    with torch.no_grad():
        aux = [(vq @ (w_upc @ p["w_k"])) @ qb.transpose(1, 2),  # Cc KABS
               vq @ (w_upc @ p["w_v"]),  # Cc W_v
               vq @ (w_upc @ w_upc.t()) @ vq.transpose(1, 2),  # Cc Cc^T
               kq @ w_down.sum(0),  # 1^T A
               qb @ p["w_k"].sum(0),  # 1^T KABS
               p["w_v"].sum(0)]  # 1^T W_v
    return a, vq @ w_upc, vq @ up_mean, p["gate"], kabs, p["w_v"], aux




def nearl_layer(x: torch.Tensor, q: torch.Tensor, params: Mapping[str, torch.Tensor], *,
                mask: Optional[torch.Tensor] = None, orth: str = "hard", heads: int = 4):
    """Fused NEARL layer. x (B, N, d), q (B, M, D) or (M, D), mask (B, N) bool or None.

    Returns (x_out (B, N, d) in x's dtype, q_out (B, M, D) in q's dtype), plus cos2 (B, N) float32
    with orth="soft". Arguments are validated by `nearl.ops.nearl_layer`; float64 inputs (gradcheck)
    run the reference.
    """
    if any(t.dtype == torch.float64 for t in (x, q)):
        return reference.nearl_layer(x, q, params, mask=mask, orth=orth, heads=heads)  # gradcheck runs here
    L.check_kernel_limits(x, q)
    B = x.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        p = {k: (v.float() if torch.is_tensor(v) else v) for k, v in params.items()}
        qf = q.float()
        if qf.dim() == 2:
            qf = qf.unsqueeze(0).expand(B, -1, -1)
        if not L.fused_supported(heads * q.shape[-2], q.shape[-1], x.dtype, x.device, q.shape[-2]):
            a, c = reference.oca_factors(qf, p["w_down"], p["w_up"], p["w_ok"], p["w_ov"])
            return _split_layer(x, q, qf, a, c, p, mask, orth, heads)
        x_out, cos2, u_all, _ = L.layer_tokens(x, *layer_operands(qf, p, heads), mask, orth)
        q_out = reference.query_tail(qf, L.head_diagonal(u_all, heads), p).to(q.dtype)
    return (x_out, q_out, cos2) if orth == "soft" else (x_out, q_out)


def _split_layer(x, q, qf, a, c, p, mask, orth, heads):
    """The layer for query banks too large for the fused kernels: x_out from the fused OCA kernels,
    then the query update in torch. The OCA runs on a float32 copy of x so that the query update
    reads the un-rounded x_out, as the fused kernels and the reference do (one more pass over x:
    this is the slower path)."""
    res = oca(x.float(), a, c, p["gate"], orth=orth)
    x_out, cos2 = res if orth == "soft" else (res, None)
    q_out = reference.query_update(qf, reference.layer_norm(x_out), p, mask, heads).to(q.dtype)
    x_out = x_out.to(x.dtype)
    return (x_out, q_out, cos2) if orth == "soft" else (x_out, q_out)
