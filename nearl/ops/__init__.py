"""The public functional API (SPEC section 4): `oca` and `nearl_layer`.

`impl="reference"` runs the plain-PyTorch statement of the math (nearl/ops/reference.py);
`impl="triton"` runs the fused kernels (`nearl_kernels`, the kernels/ folder); `impl="auto"` picks
Triton for CUDA tensors (or everywhere under TRITON_INTERPRET=1) and the reference otherwise.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

# nearl_kernels.runtime imports no Triton, so this decorates no kernel (TRITON_INTERPRET may be set later).
from nearl_kernels.runtime import interpreting

from nearl.ops import reference
from nearl.ops.validation import check_layer_args, check_oca_args

IMPLS = ("auto", "reference", "triton")


def _resolve(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (x.is_cuda or interpreting()) else "reference"
    if impl == "triton" and not (x.is_cuda or interpreting()):
        raise ValueError(f"impl='triton' needs CUDA tensors (x is on {x.device}) or TRITON_INTERPRET=1 "
                         "to run the kernels on the CPU interpreter")
    return impl


def _kernel(name: str):
    """The fused op (`nearl_kernels`; the layer composed in `nearl.ops.fused_layer`), imported on first
    use (so TRITON_INTERPRET may be set late), or a clear error when it cannot load. Plain import
    statements, which torch.compile traces. float64 inputs (gradcheck) run the reference instead:
    the kernels are float32."""
    try:
        if name == "oca":
            from nearl_kernels.oca import oca as fn
        else:
            from nearl.ops.fused_layer import nearl_layer as fn
    except ImportError as err:
        raise NotImplementedError(f"impl='triton' is not available: the kernel for {name} could not be "
                                  f"loaded ({err}); use impl='reference'") from err
    return fn


def oca(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, gate: torch.Tensor, *,
        orth: str = "hard", impl: str = "auto"):
    """Orthogonal cross-attention: x + gate * orth(softmax(LN(x) @ a, dim=-1) @ c, x).

    x (B, N, d), a (B, d, M), c (B, M, d), gate () -> (B, N, d) in x's dtype.
    With orth="soft" returns (out, cos2), cos2 (B, N) float32 (float64 for float64 inputs).
    """
    check_oca_args(x, a, c, gate, orth)
    if _resolve(impl, x) == "triton" and not any(t.dtype == torch.float64 for t in (x, a, c, gate)):
        return _kernel("oca")(x, a, c, gate, orth=orth)
    return reference.oca(x, a, c, gate, orth=orth)


def nearl_layer(x: torch.Tensor, q: torch.Tensor, params: Mapping[str, torch.Tensor], *,
                mask: Optional[torch.Tensor] = None, orth: str = "hard", impl: str = "auto",
                check_mask_rows: Optional[bool] = None):
    """One NEARL layer: OCA on the tokens, then the USEformer query update (SPEC 3.1).

    x (B, N, d), q (B, M, D) or (M, D), mask (B, N) bool (True = attend) or None.
    params: the tensors named in validation.LAYER_PARAM_SHAPES, plus an optional int "heads" (4).
    Returns (x_out (B, N, d) in x's dtype, q_out (B, M, D) in q's dtype), and cos2 (B, N) with
    orth="soft".
    check_mask_rows: whether every sample must have a valid position. None (default): checked
    without a host sync (a CPU mask at once; a CUDA mask by an asynchronous device-side assert);
    True: read on the host, a ValueError naming the samples (on a GPU this waits for it); False:
    not checked, for callers whose masks hold it by construction.
    """
    sizes = check_layer_args(x, q, params, mask, orth, check_mask_rows)
    if _resolve(impl, x) == "triton":
        return _kernel("nearl_layer")(x, q, params, mask=mask, orth=orth, heads=sizes["H"])
    return reference.nearl_layer(x, q, params, mask=mask, orth=orth, heads=sizes["H"])
