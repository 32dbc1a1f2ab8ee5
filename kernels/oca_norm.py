"""OCA and the LayerNorm of its output, as one autograd node: the split layer's token-sized start.

    x_out, xa, cos2 = oca_norm(x, a, c, gate, orth=...)    # xa = LN(x_out); cos2 None unless "soft"

The split path (`nearl.ops.split_layer`) uses x_out twice: it is the layer's output, and LN(x_out)
is what the queries read. With `ops.oca` and `F.layer_norm` as two autograd nodes, the backward
runs LayerNorm's backward and then adds x_out's two gradients, 6 passes over (B, N, d). Here the
node receives both gradients and joins them in one kernel (`layer_norm_fork.ln_fork_bwd`: 4
passes) before the OCA backward kernels. x_out is a fresh tensor, not a view of anything, so a
caller may still modify it in place.

The forward is one kernel (`oca_norm_fwd`, kernels/oca.py): the OCA forward's output pass writes
LN(x_out) beside x_out, with float32 statistics of x_out before its rounding to x's dtype, known
before the pass from the row sums the first pass already makes. That saves torch's LayerNorm (a read
of x_out and a write, plus its statistics) at M <= 16; with more queries the kernel's registers would
spill, and torch's `F.layer_norm` follows the kernel. Under `torch.compile` the op is `oca` (its
custom op) and `F.layer_norm`: inductor fuses them and LayerNorm's backward with the add itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .layer_norm_fork import ln_fork_bwd
from .oca import layer_norm_rows, oca, oca_bwd, oca_norm_fwd, refuse_float64


class _OcaNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, c, gate, orth):
        out, xa, cos2 = oca_norm_fwd(x, a, c, gate, orth)
        ctx.save_for_backward(x, a, c, gate, out)
        ctx.orth = orth
        return (out, xa) if cos2 is None else (out, xa, cos2)

    @staticmethod
    @once_differentiable  # double backward raises (docs/python.md, "Double backward")
    def backward(ctx, dout, dxa, dcos2=None):
        x, a, c, gate, out = ctx.saved_tensors
        dx, da, dc, dgate = oca_bwd(ln_fork_bwd(dxa, out, dout), dcos2, x, a, c, gate, ctx.orth)
        return dx, da, dc, dgate, None


def oca_norm(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, *,
             orth: str = "hard") -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """x (B, N, d) float32/bfloat16/float16, a (B, d, M), c (B, M, d), gate () -> (x_out (B, N, d),
    LN(x_out) (B, N, d), both in x's dtype, and cos2 (B, N) float32 for orth="soft", else None).

    x_out is `oca`'s (same limits: d <= 8192, M <= 64); LN has no affine parameters. float64
    inputs are refused, as `oca` refuses them."""
    refuse_float64(x, a, c, gate)
    if torch.compiler.is_compiling():
        res = oca(x, a, c, gate, orth=orth)
        out, cos2 = res if orth == "soft" else (res, None)
        return out, layer_norm_rows(out), cos2
    res = _OcaNormFunction.apply(x, a, c, gate, orth)
    return res if orth == "soft" else (*res, None)


__all__ = ["oca_norm"]
