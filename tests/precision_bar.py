"""SPEC section 7's precision bar for 16-bit inputs, flash-attention's rule:

    err(Y_kernel) <= 2 * err(Y_peer) + err(round_to_dtype(Y_64))

for every output and gradient Y, errors norm-relative against float64 on the same inputs. The peer
is the same math in plain PyTorch at the input precision, as autocast runs it: every matmul's
operands in the input dtype and its result rounded to it (float32 accumulation); LayerNorm, softmax,
the projection's dot products and the elementwise math in float32 (`peer_layer`). The reference
path under autocast runs float32 throughout (nearl/ops/reference.py turns autocast off), so a kernel
under this bar is never worse than it either as long as it meets the float32 bar in float32.
"""
import math

import torch
import torch.nn.functional as F

from einsum_math import layer64
from nearl.ops import reference


def tf32(t):
    """t's float32 values as the tensor cores read a TF32 operand, the low 13 mantissa bits dropped
    (the gradient passes straight through: the backward's products see truncated forward operands)."""
    t = t.float()
    cut = (t.detach().contiguous().view(torch.int32) & -8192).view(torch.float32)
    return t + (cut - t).detach()


def peer_layer(x, q, params, mask, orth):
    """The layer at x's precision: products of operands rounded to x.dtype, results rounded to it;
    for float32 x below "highest" matmul precision, TF32 products (operands truncated to TF32)."""
    dt, B, heads = x.dtype, x.shape[0], params["heads"]

    def mm(a, b):
        if dt == torch.float32:
            return a @ b if torch.get_float32_matmul_precision() == "highest" else tf32(a) @ tf32(b)
        return (a.to(dt) @ b.to(dt)).float()
    p = {k: (v.float() if torch.is_tensor(v) else v) for k, v in params.items()}
    qf = q.float().expand(B, *q.shape[-2:])
    a = mm(p["w_down"], mm(qf, p["w_ok"]).transpose(1, 2)) / math.sqrt(p["w_down"].shape[1])
    c = mm(mm(qf, p["w_ov"]), p["w_up"])
    xf = x.float()
    delta = mm(torch.softmax(mm(reference.layer_norm(xf), a), -1), c)
    update, cos2 = reference.orth_update(delta, xf, orth)
    x_out = xf + p["gate"] * update
    xa = reference.layer_norm(x_out)
    M, D = qf.shape[1:]
    dh = D // heads
    qh = mm(reference.layer_norm_q(qf, p), p["w_q"]).view(B, M, heads, dh).transpose(1, 2)
    kh, vh = (mm(xa, p[w]).view(B, -1, heads, dh).transpose(1, 2) for w in ("w_k", "w_v"))
    s = mm(qh, kh.transpose(-1, -2)) / math.sqrt(dh)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        vh = vh.masked_fill(~mask[:, None, :, None], 0.0)
    u = mm(torch.softmax(s, -1), vh).transpose(1, 2).reshape(B, M, D)
    q1 = qf + mm(u, p["w_o"])
    h = F.layer_norm(q1, (D,), p["ln_f_weight"], p["ln_f_bias"], eps=reference.LN_EPS)
    h = F.gelu(mm(h, p["mlp_w1"]) + p["mlp_b1"])
    q_out = (q1 + mm(h, p["mlp_w2"]) + p["mlp_b2"]).to(q.dtype)
    out = (x_out.to(dt), q_out)
    return out + (cos2,) if orth == "soft" else out


def err(got, want):
    """Norm-relative error. Where the reference is exactly zero (W_k, W_q and LN_q get no gradient
    when every sample has a single key: its softmax weight is 1 whatever the score), the flash-style
    backward computes dP - rowsum(dU * U) from two different products and leaves float32 noise, so
    there the largest absolute value (inputs are O(1)) is the error."""
    got, want = got.double(), want.double()
    if not want.any():
        return got.abs().max().item()
    return ((got - want).norm() / want.norm()).item()


def run_layer(how, x, q, params, mask, orth, upstream):
    """Outputs and every input's gradient: how = "float64", "peer" (`peer_layer`) or a callable
    taking (x, q, params, mask, orth)."""
    x = x.detach().requires_grad_()
    q = q.detach().requires_grad_()
    tensors = {k: v.detach().requires_grad_() for k, v in params.items() if torch.is_tensor(v)}
    p = dict(tensors, heads=params["heads"])
    if how == "float64":
        outs = layer64(x, q, p, mask=mask, orth=orth, heads=p["heads"])
    elif how == "peer":
        outs = peer_layer(x, q, p, mask, orth)
    else:
        outs = how(x, q, p, mask, orth)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    inputs = {"x": x, "q": q, **tensors}
    grads = torch.autograd.grad(loss, list(inputs.values()))
    return [o.detach() for o in outs], dict(zip(inputs, grads))


def bars(got, peer, want, sensitivity=None):
    """{name: (error, bar)} for every output ("out0", ...) and gradient, from three run_layer results.
    sensitivity: {name: float}, the bar of an ill-conditioned scalar where that is larger."""
    (g_out, g_grad), (p_out, p_grad), (w_out, w_grad) = got, peer, want
    pairs = [(f"out{i}", g, p, w) for i, (g, p, w) in enumerate(zip(g_out, p_out, w_out))]
    pairs += [(k, g_grad[k], p_grad[k], w) for k, w in w_grad.items()]
    out = {name: (err(g, w), 2 * err(p, w) + err(w.to(g.dtype), w)) for name, g, p, w in pairs}
    # an exactly-zero gradient (W_k, W_q, LN_q where every sample has a single key: its softmax
    # weight is 1 whatever the score): the flash-style backward forms it as dP - rowsum(dU * U) from
    # two products and leaves float32 noise, judged in absolute terms (inputs are O(1))
    for name, g, p, w in pairs:
        if not w.any():
            out[name] = (out[name][0], max(out[name][1], 1e-4))
    for name, s in (sensitivity or {}).items():
        out[name] = (out[name][0], max(out[name][1], s))
    return out


def ulp_sensitivity(x, q, params, mask, orth, upstream, name="gate", trials=3):
    """How much the float64 gradient `name` moves when every element of x moves by one unit in the
    last place of x's dtype (random signs): the median relative change over `trials` draws. The gate's
    gradient is a sum over every token with heavy cancellation; SPEC 7 judges it against this."""
    _, want = run_layer("float64", x, q, params, mask, orth, upstream)
    g = torch.Generator().manual_seed(11)
    changes = []
    for _ in range(trials):
        up = torch.randint(0, 2, x.shape, generator=g).bool().to(x.device)
        moved = torch.where(up, torch.nextafter(x, torch.full_like(x, math.inf)),
                            torch.nextafter(x, torch.full_like(x, -math.inf)))
        changes.append(err(run_layer("float64", moved, q, params, mask, orth, upstream)[1][name], want[name]))
    return sorted(changes)[len(changes) // 2]


def rounding_sensitivity(x, q, params, mask, orth, upstream, name="gate"):
    """How much the float64 gradient `name` moves when the gradient reaching x_out (from both its
    uses: the layer's output and LN(x_out)) is rounded once, correctly, to x's dtype. A path whose
    x_out is a tensor of x's dtype hands that gradient on in that dtype (the OCA backward kernels
    take it so); the peer keeps x_out in float32 and does not. For the gate's gradient, a sum with
    heavy cancellation, this one rounding can weigh more than the one-ulp moves of x."""
    _, want = run_layer("float64", x, q, params, mask, orth, upstream)

    def rounded(x_, q_, p_, mask_, orth_):
        return layer64(x_, q_, p_, mask=mask_, orth=orth_, heads=p_["heads"],
                       xout_hook=lambda g: g.to(x.dtype).to(g.dtype))
    return err(run_layer(rounded, x, q, params, mask, orth, upstream)[1][name], want[name])
