"""The NEARL layer unfused ("split"): the OCA kernels for x_out, then the query update in torch.

What a careful engineer writes without a fused layer, and on the GPU often the faster path
(`nearl.ops.layer_path` chooses): x_out and its LayerNorm from one kernel (`oca_norm`, whose
backward joins x_out's two gradients in one kernel), one product with the concatenated key and
value weights (cuBLAS), scaled_dot_product_attention of the M queries over the N tokens (a flash kernel), then the
(B, M, D)-sized tail (`query_math`). The token-sized work runs in x's dtype:
for bfloat16 / float16 x, 16-bit operands with float32 accumulation and LayerNorm statistics, as
SPEC section 7 allows; for float32 x, float32 operands whose products follow
`torch.get_float32_matmul_precision()`, as torch.matmul's do.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from nearl_kernels.oca_norm import oca_norm

from nearl.ops import query_math


def split_layer(x: torch.Tensor, qf: torch.Tensor, p: Mapping[str, torch.Tensor], mask: Optional[torch.Tensor],
                orth: str, heads: int):
    """x (B, N, d) in its dtype; qf (B, M, D) and the weights p in float32; mask (B, N) bool or None.

    Returns (x_out (B, N, d) in x's dtype, q_out (B, M, D) float32, cos2 (B, N) or None)."""
    B, N, d = x.shape
    M, D = qf.shape[1], qf.shape[2]
    dh = D // heads
    dt = x.dtype
    a, c = query_math.oca_factors(qf, p["w_down"], p["w_up"], p["w_ok"], p["w_ov"])
    x_out, xa, cos2 = oca_norm(x, a, c, p["gate"], orth=orth)  # xa = LN(x_out): x's dtype, float32 statistics
    kv = xa @ torch.cat([p["w_k"], p["w_v"]], dim=1).to(dt)  # (B, N, 2D): one product for keys and values
    if mask is not None:  # padding reaches nothing, whatever it holds: a NaN key or value would (0 * NaN)
        kv = kv.masked_fill(~mask[..., None], 0.0)
    kh, vh = (t.reshape(B, N, heads, dh).transpose(1, 2) for t in kv.split(D, dim=-1))
    qh = (query_math.layer_norm_q(qf, p) @ p["w_q"]).view(B, M, heads, dh).transpose(1, 2).to(dt)
    keep = mask[:, None, None, :] if mask is not None else None
    u = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=1.0 / math.sqrt(dh))
    q_out = query_math.query_tail(qf, u.transpose(1, 2).reshape(B, M, D).float(), p)
    return x_out, q_out, cos2


__all__ = ["split_layer"]
