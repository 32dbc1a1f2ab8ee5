"""An independent float64 statement of SPEC 3.1, written with einsum and explicit loops.

It shares no code with nearl/ops/reference.py, so a mistake in one is caught by the other.
"""
import math

import torch


def ln64(x, weight=None, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def softmax64(s, dim):
    s = s - s.amax(dim, keepdim=True)
    e = torch.exp(s)
    return e / e.sum(dim, keepdim=True)


def oca64(x, a, c, gate, orth="hard"):
    x, a, c, gate = (t.double() for t in (x, a, c, gate))
    p = softmax64(torch.einsum("bnd,bdm->bnm", ln64(x), a), -1)
    delta = torch.einsum("bnm,bmd->bnd", p, c)
    dot = torch.einsum("bnd,bnd->bn", delta, x)
    xx = torch.einsum("bnd,bnd->bn", x, x)
    if orth == "hard":
        return x + gate * (delta - (dot / (xx + 1e-6))[..., None] * x)
    if orth == "soft":
        dd = torch.einsum("bnd,bnd->bn", delta, delta)
        return x + gate * delta, dot ** 2 / (dd * xx + 1e-12)
    return x + gate * delta


def layer64(x, q, p, mask=None, orth="hard", heads=4, xout_hook=None):
    B, N, d = x.shape
    x = x.double()
    q = q.double()
    p = {k: (v.double() if torch.is_tensor(v) else v) for k, v in p.items()}
    if q.dim() == 2:
        q = q.unsqueeze(0).expand(B, -1, -1)
    M, D = q.shape[1:]
    r = p["w_down"].shape[1]
    kq = torch.einsum("bmD,Dr->bmr", q, p["w_ok"])
    vq = torch.einsum("bmD,Dr->bmr", q, p["w_ov"])
    a = torch.einsum("dr,bmr->bdm", p["w_down"], kq) / math.sqrt(r)
    c = torch.einsum("bmr,rd->bmd", vq, p["w_up"])
    res = oca64(x, a, c, p["gate"], orth)
    xout = res[0] if orth == "soft" else res
    if xout_hook is not None:  # sees the gradient reaching x_out from both its uses
        xout.register_hook(xout_hook)
    xa = ln64(xout)
    qn = ln64(q, p["ln_q_weight"], p["ln_q_bias"])
    dh = D // heads
    heads_out = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        qh = qn @ p["w_q"][:, cols]
        kh = xa @ p["w_k"][:, cols]
        vh = xa @ p["w_v"][:, cols]
        s = torch.einsum("bme,bne->bmn", qh, kh) / math.sqrt(dh)
        if mask is not None:
            s = torch.where(mask[:, None, :], s, torch.full_like(s, -math.inf))
        heads_out.append(torch.einsum("bmn,bne->bme", softmax64(s, -1), vh))
    q = q + torch.cat(heads_out, -1) @ p["w_o"]
    h = ln64(q, p["ln_f_weight"], p["ln_f_bias"]) @ p["mlp_w1"] + p["mlp_b1"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    q = q + h @ p["mlp_w2"] + p["mlp_b2"]
    return (xout, q, res[1]) if orth == "soft" else (xout, q)
