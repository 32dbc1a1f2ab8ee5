"""The query side's per-sample math, (B, M, D)-sized, that every path of the layer runs as it is: the
float64 reference (`nearl.ops.reference`), the fused kernels' (`nearl.ops.fused_layer`) and the split path
(`nearl.ops.split_layer`). What differs between the paths is the token-sized part, not this."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from nearl_kernels.policy import LN_EPS  # torch only, no Triton


def oca_factors(q, w_down, w_up, w_ok, w_ov):
    """The per-sample OCA matrices of SPEC 3.1: A = W_down Kq^T / sqrt(r) (B, d, M), C = Vq W_up (B, M, d).

    A is one (d, r) x (r, B*M) product, scaled on the weight, viewed as (B, d, M) with each row's M
    entries contiguous, as the kernels read them (a batched W_down Kq^T, then / sqrt(r), would read
    W_down once a sample, copy the transposed Kq and rescale A: more batch-sized work). The kernels
    read A through its strides."""
    r = w_down.shape[1]
    kq = q @ w_ok
    a = (w_down / math.sqrt(r)) @ kq.reshape(-1, r).t()  # (d, B*M)
    a = a.view(w_down.shape[0], *kq.shape[:-1]).movedim(0, -2)
    c = (q @ w_ov) @ w_up
    return a, c


def layer_norm_q(q, params: Mapping[str, torch.Tensor]):
    return F.layer_norm(q, q.shape[-1:], params["ln_q_weight"], params["ln_q_bias"], eps=LN_EPS)


def query_tail(q, u, params: Mapping[str, torch.Tensor]):
    """Q + U W_o, then the residual MLP on LN_f: the (B, M, D)-sized rest of the query update.
    Each residual and bias is added by the product that makes its other term (addmm, linear), so
    no elementwise op writes and re-reads a product: `Q + U W_o` and `h W_1 + b_1` are one op each."""
    D = q.shape[-1]
    q = torch.addmm(q.reshape(-1, D), u.reshape(-1, D), params["w_o"]).view(q.shape)
    h = F.layer_norm(q, q.shape[-1:], params["ln_f_weight"], params["ln_f_bias"], eps=LN_EPS)
    h = F.gelu(F.linear(h, params["mlp_w1"].t(), params["mlp_b1"]))
    return torch.addmm(q.reshape(-1, D), h.reshape(-1, h.shape[-1]), params["mlp_w2"]).view(q.shape) + params["mlp_b2"]
