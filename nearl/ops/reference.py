"""Plain-PyTorch reference of SPEC section 3.1: the readable statement of the math.

Every reduction runs in float32 (float64 when an input is float64, so `gradcheck` works), whatever
the input dtype and whatever autocast says; outputs come back in the input dtype. The fused Triton
kernels in `nearl_kernels` (the kernels/ folder) are tested against these functions evaluated in float64.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

# The epsilons are the kernels' (one source): LN_EPS of LayerNorm, ORTH_EPS of the projection's
# <X, X> + eps (SPEC 3.1), COS2_EPS keeps cos^2 finite (and 0) when Delta = 0, as it is at init.
from nearl_kernels.policy import COS2_EPS, LN_EPS, ORTH_EPS  # torch only, no Triton

# The (B, M, D)-sized math every path runs (the fused and split paths too) lives in its own module;
# the reference composes it with its plain statement of the token-sized part.
from nearl.ops.query_math import layer_norm_q, oca_factors, query_tail  # noqa: F401  (reference.<name> is public)

ORTH_MODES = ("hard", "soft", "none")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every reduction runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine parameters (SPEC's LN)."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def orth_update(delta: torch.Tensor, x: torch.Tensor, orth: str):
    """The part of `delta` that is added to `x`, and cos^2(delta, x) per token for orth="soft"."""
    if orth == "none":
        return delta, None
    dot = (delta * x).sum(-1)
    xx = (x * x).sum(-1)
    if orth == "hard":
        return delta - (dot / (xx + ORTH_EPS)).unsqueeze(-1) * x, None
    cos2 = dot * dot / ((delta * delta).sum(-1) * xx + COS2_EPS)
    return delta, cos2


def oca_math(x, a, c, gate, orth: str):
    """OCA in the compute dtype: returns (x_out, cos2 or None), neither cast back."""
    dt = compute_dtype(x, a, c, gate)
    x, a, c, gate = (t.to(dt) for t in (x, a, c, gate))
    p = torch.softmax(layer_norm(x) @ a, dim=-1)  # (B, N, M)
    delta = p @ c  # (B, N, d)
    update, cos2 = orth_update(delta, x, orth)
    return x + gate * update, cos2


def oca(x, a, c, gate, *, orth: str = "hard"):
    """x + gate * orth(softmax(LN(x) @ a) @ c, x); with orth="soft" also cos^2 (B, N)."""
    with torch.autocast(x.device.type, enabled=False):
        out, cos2 = oca_math(x, a, c, gate, orth)
    out = out.to(x.dtype)
    if orth == "soft":
        return out, cos2.to(compute_dtype(cos2))
    return out


def query_attention(qn, xa, params: Mapping[str, torch.Tensor], mask: Optional[torch.Tensor], heads: int):
    """concat_h softmax(S_h) @ (xa W_v[h]): the normalised queries qn (B, M, D) read xa (B, N, d)."""
    B, M, D = qn.shape
    N = xa.shape[1]
    dh = D // heads
    qh = (qn @ params["w_q"]).view(B, M, heads, dh).transpose(1, 2)  # (B, H, M, dh)
    kh = (xa @ params["w_k"]).view(B, N, heads, dh).transpose(1, 2)  # (B, H, N, dh)
    vh = (xa @ params["w_v"]).view(B, N, heads, dh).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(dh)  # (B, H, M, N)
    if mask is not None:  # masked tokens reach nothing, whatever they hold (0 * NaN is NaN): scores and values
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        vh = vh.masked_fill(~mask[:, None, :, None], 0.0)
    return (torch.softmax(s, dim=-1) @ vh).transpose(1, 2).reshape(B, M, D)


def query_update(q, xa, params: Mapping[str, torch.Tensor], mask: Optional[torch.Tensor], heads: int):
    """USEformer: the queries (B, M, D) read the adapted, normalised tokens xa (B, N, d)."""
    return query_tail(q, query_attention(layer_norm_q(q, params), xa, params, mask, heads), params)


def nearl_layer(x, q, params: Mapping[str, torch.Tensor], *, mask=None, orth: str = "hard", heads: int = 4):
    """One NEARL layer (SPEC 3.1): OCA on the tokens, then the USEformer query update.

    x (B, N, d), q (B, M, D) or (M, D), mask (B, N) bool or None. Returns (x_out, q_out), plus the
    per-token cos^2 (B, N) with orth="soft". x_out has x's dtype, q_out q's dtype.
    """
    B = x.shape[0]
    tensors = [x, q, *(v for v in params.values() if torch.is_tensor(v) and v.is_floating_point())]
    dt = compute_dtype(*tensors)
    with torch.autocast(x.device.type, enabled=False):
        p = {k: (v.to(dt) if torch.is_tensor(v) else v) for k, v in params.items()}
        qf = q.to(dt)
        if qf.dim() == 2:
            qf = qf.unsqueeze(0).expand(B, -1, -1)
        a, c = oca_factors(qf, p["w_down"], p["w_up"], p["w_ok"], p["w_ov"])
        x_out, cos2 = oca_math(x, a, c, p["gate"], orth)
        # LN of the un-rounded x_out, as the fused kernel computes it from registers.
        q_out = query_update(qf, layer_norm(x_out), p, mask, heads)
    out = (x_out.to(x.dtype), q_out.to(q.dtype))
    return out + (cos2,) if orth == "soft" else out
