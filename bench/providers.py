"""The implementations the kernel benchmarks compare (`--providers`).

- reference: the eager PyTorch reference through the public API (`impl="reference"`).
- compile:   `torch.compile` of the reference function (default mode).
- xformers:  the reference with its attention done by `xformers.ops.memory_efficient_attention`.
- sdpa:      the reference with its attention done by `torch.nn.functional.scaled_dot_product_attention`.
- split:     (layer only) the library's unfused path (`nearl.ops.split_layer`): the fused OCA kernel, then
             `LN(x_out) @ [W_k | W_v]` as one matrix product (cuBLAS on a GPU) and the small query
             attention (M queries over N tokens, sdpa) and tail in PyTorch: what a careful engineer
             writes without a fused layer, and what `impl="triton"` runs where `nearl.ops.layer_path`
             finds it faster.
- triton:    the fused kernels (`impl="triton"`; for the layer, its fused path whatever
             `nearl.ops.layer_path` would choose).

OCA as attention: the N tokens are the queries, the M per-sample columns of A the keys and the rows
of C the values: scores = LN(x) @ a = q k^T with q = LN(x) (B, N, d), k = a^T (B, M, d), v = c
(B, M, d), scale 1, one head. The orthogonal projection and the residual stay in torch.
For the layer, the query update's attention (M queries over N keys, text padding mask) goes through
the same backend. In the xformers / sdpa providers the attention and the (B, N, d) x (d, D)
projections run in the input dtype (as one would write them for speed); LayerNorm statistics and
the projection's dot products run in float32, as SPEC section 2 requires of every implementation.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nearl import ops

from nearl.ops import reference

PROVIDERS = ("reference", "compile", "xformers", "sdpa", "split", "triton")


class Skip(Exception):
    """A provider that cannot run here; the message is the reason printed in the table."""


# ---------------------------------------------------------------------------- attention backends
def sdpa_attend(q, k, v, mask: Optional[torch.Tensor], scale: float):
    """q (B, H, Lq, E), k / v (B, H, Lk, E); mask broadcastable to (B, H, Lq, Lk), True = attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def xformers_attend(q, k, v, mask: Optional[torch.Tensor], scale: float):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        # xformers wants an additive bias whose rows are 8-element aligned: allocate padded, slice.
        padded = (Lk + 7) // 8 * 8
        bias = q.new_zeros(B, H, Lq, padded)[..., :Lk]
        bias.masked_fill_(~mask.expand(B, H, Lq, Lk), float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, p=0.0, scale=scale)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------- ops through a backend
def _oca_core(x, a, c, gate, orth: str, attend: Callable):
    """OCA with the attention on `attend`; returns (x_out, cos2) in the compute dtype."""
    dt = x.dtype
    cdt = reference.compute_dtype(x, a, c, gate)
    xf = x.to(cdt)
    q = reference.layer_norm(xf).to(dt).unsqueeze(1)  # (B, 1, N, d)
    k = a.transpose(1, 2).to(dt).unsqueeze(1)  # (B, 1, M, d)
    v = c.to(dt).unsqueeze(1)  # (B, 1, M, d)
    delta = attend(q, k, v, None, 1.0).squeeze(1).to(cdt)  # (B, N, d)
    update, cos2 = reference.orth_update(delta, xf, orth)
    return xf + gate.to(cdt) * update, cos2


def oca_via(attend: Callable, x, a, c, gate, *, orth: str = "hard"):
    with torch.autocast(x.device.type, enabled=False):
        out, cos2 = _oca_core(x, a, c, gate, orth, attend)
    out = out.to(x.dtype)
    return (out, cos2) if orth == "soft" else out


def _small_terms(x, q, params):
    """The reference's (B, M, D)-sized setup in the compute dtype (float32, float64 for float64
    inputs): the params, q broadcast over the batch, the OCA factors A and C."""
    cdt = reference.compute_dtype(x, q, *(v for v in params.values() if torch.is_tensor(v)))
    p = {k: (v.to(cdt) if torch.is_tensor(v) else v) for k, v in params.items()}
    qf = q.to(cdt)
    if qf.dim() == 2:
        qf = qf.unsqueeze(0).expand(x.shape[0], -1, -1)
    a, c = reference.oca_factors(qf, p["w_down"], p["w_up"], p["w_ok"], p["w_ov"])
    return p, qf, a, c, cdt


def layer_via(attend: Callable, x, q, params, mask=None, *, orth: str = "hard"):
    heads = params.get("heads", 4)
    B, N, _ = x.shape
    dt = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        p, qf, a, c, cdt = _small_terms(x, q, params)
        M, D = qf.shape[1], qf.shape[2]
        dh = D // heads
        x_out, cos2 = _oca_core(x, a, c, p["gate"], orth, attend)
        # Query update: M queries attend over the N adapted tokens (masked), H heads.
        xa = reference.layer_norm(x_out).to(dt)
        qh = (reference.layer_norm_q(qf, p) @ p["w_q"]).view(B, M, heads, dh).transpose(1, 2).to(dt)
        kh = (xa @ params["w_k"].to(dt)).view(B, N, heads, dh).transpose(1, 2)
        vh = (xa @ params["w_v"].to(dt)).view(B, N, heads, dh).transpose(1, 2)
        m = mask[:, None, None, :] if mask is not None else None
        u = attend(qh, kh, vh, m, 1.0 / math.sqrt(dh)).transpose(1, 2).reshape(B, M, D).to(cdt)
        qo = reference.query_tail(qf, u, p)
    out = (x_out.to(dt), qo.to(q.dtype))
    return out + (cos2,) if orth == "soft" else out


def layer_path_fn(orth: str, path: str) -> Callable:
    """The layer on the kernels down one path, whatever `nearl.ops.layer_path` would choose: "fused"
    (provider `triton`) or "split" (provider `split`: the library's `nearl.ops.split_layer`)."""
    from nearl.ops.fused_layer import nearl_layer as kernels_layer
    from nearl.ops.validation import check_layer_args

    def fn(x, q, params, mask):
        # the benchmark's masks hold a valid position by construction, as the model's do: no row check
        sizes = check_layer_args(x, q, params, mask, orth, False)
        return kernels_layer(x, q, params, mask=mask, orth=orth, heads=sizes["H"], path=path)
    return fn


# ---------------------------------------------------------------------------- the providers
def _reference_fn(kernel: str, orth: str) -> Callable:
    """The reference function itself (what `compile` compiles: no argument checks inside)."""
    if kernel == "oca":
        return lambda x, a, c, gate: reference.oca(x, a, c, gate, orth=orth)
    return lambda x, q, params, mask: reference.nearl_layer(x, q, params, mask=mask, orth=orth,
                                                            heads=params.get("heads", 4))


def _api_fn(kernel: str, orth: str, impl: str) -> Callable:
    if kernel == "oca":
        return lambda x, a, c, gate: ops.oca(x, a, c, gate, orth=orth, impl=impl)
    # the benchmark's masks hold a valid position by construction, as the model's do: no row check
    return lambda x, q, params, mask: ops.nearl_layer(x, q, params, mask=mask, orth=orth, impl=impl,
                                                      check_mask_rows=False)


def _via_fn(kernel: str, orth: str, attend: Callable) -> Callable:
    if kernel == "oca":
        return functools.partial(oca_via, attend, orth=orth)
    return lambda x, q, params, mask: layer_via(attend, x, q, params, mask, orth=orth)


def _allow_retain_graph() -> None:
    """Compiled backwards "donate" the saved activations to their outputs by default, which forbids
    backward(retain_graph=True), and the bwd mode times the backward again and again on one forward.
    Donation saves memory, not time; turn it off for the whole benchmark process."""
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def make_provider(name: str, kernel: str, orth: str, device: torch.device) -> Callable:
    """The callable for one provider, or Skip(reason) when it cannot exist here.

    A provider may still fail on its first call (the Triton kernels not written yet, torch.compile
    without a compiler): the caller runs it once before timing and turns that into a skipped row.
    """
    if name == "reference":
        return _api_fn(kernel, orth, "reference")
    if name == "triton":
        if device.type != "cuda" and not ops.interpreting():
            raise Skip("needs a CUDA device or TRITON_INTERPRET=1")
        return _api_fn(kernel, orth, "triton") if kernel == "oca" else layer_path_fn(orth, "fused")
    if name == "split":
        if kernel != "layer":
            raise Skip("the layer's unfused peer (fused OCA + torch query update): --kernel layer only")
        if device.type != "cuda" and not ops.interpreting():
            raise Skip("needs a CUDA device or TRITON_INTERPRET=1")
        return layer_path_fn(orth, "split")
    if name == "sdpa":
        return _via_fn(kernel, orth, sdpa_attend)
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError:
            raise Skip("not installed") from None
        if device.type != "cuda":
            raise Skip("xformers' memory_efficient_attention needs a CUDA device")
        return _via_fn(kernel, orth, xformers_attend)
    if name == "compile":
        if not hasattr(torch, "compile"):
            raise Skip("torch.compile is not available in this torch")
        _allow_retain_graph()
        return torch.compile(_reference_fn(kernel, orth))
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def skip_reason(name: str, err: BaseException) -> Optional[str]:
    """Whether an error on a provider's first call means 'skipped' (vs. a real failure).

    Missing pieces (NotImplementedError / ImportError: the kernels not written yet) skip any
    provider; torch.compile may fail for reasons of its own environment (no C++ compiler, an
    unsupported op), so any error of `compile` is reported as a skip with that error.
    """
    if isinstance(err, (NotImplementedError, ImportError)) or name == "compile":
        return f"{type(err).__name__}: {err}"
    return None
