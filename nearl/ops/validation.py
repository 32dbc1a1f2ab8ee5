"""Argument checks for the public ops: every bad input becomes a ValueError naming the argument
and the shapes seen, before any kernel runs."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from nearl.ops.reference import ORTH_MODES

Dim = Union[int, str]  # a fixed size, or a symbol that must agree across arguments

# SPEC section 4: the tensors of one nearl_layer and their shapes, in symbols.
LAYER_PARAM_SHAPES: Dict[str, Sequence[Dim]] = {
    "w_down": ("d", "r"), "w_up": ("r", "d"), "gate": (),
    "w_ok": ("D", "r"), "w_ov": ("D", "r"),
    "w_k": ("d", "D"), "w_v": ("d", "D"), "w_q": ("D", "D"), "w_o": ("D", "D"),
    "ln_q_weight": ("D",), "ln_q_bias": ("D",), "ln_f_weight": ("D",), "ln_f_bias": ("D",),
    "mlp_w1": ("D", "h"), "mlp_b1": ("h",), "mlp_w2": ("h", "D"), "mlp_b2": ("D",),
}


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_float(name: str, t) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype} "
                         f"with shape {_fmt(t.shape)}")
    return t


def check_shapes(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Sequence[Dim]],
                 sizes: Dict[str, int]) -> Dict[str, int]:
    """Match each tensor's shape against its symbolic spec; symbols bind on first sight."""
    for name, t in tensors.items():
        want = spec[name]
        if t.dim() != len(want):
            raise ValueError(f"{name} must have {len(want)} dimensions {_fmt(want)}, got shape {_fmt(t.shape)}")
        for axis, (sym, got) in enumerate(zip(want, t.shape)):
            expect = sizes.setdefault(sym, got) if isinstance(sym, str) else sym
            if got != expect:
                seen = ", ".join(f"{k}={v}" for k, v in sizes.items())
                raise ValueError(f"{name} has shape {_fmt(t.shape)} but {_fmt(want)} is required "
                                 f"(axis {axis}: expected {sym}={expect}; sizes so far: {seen})")
    return sizes


def check_same_device(tensors: Mapping[str, torch.Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {seen}")


def check_orth(orth: str) -> None:
    if orth not in ORTH_MODES:
        raise ValueError(f"orth must be one of {ORTH_MODES}, got {orth!r}")


def check_nonempty(x: torch.Tensor) -> None:
    if x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"x must have B >= 1, N >= 1 and d >= 1, got shape {_fmt(x.shape)}")


# What each size symbol means, for the message when it is 0 (SPEC: M in 1..64, every size >= 1;
# the kernels cannot launch on an empty size, and the reference would return empty tensors).
SIZE_NAMES = {"M": "queries", "D": "(the query width)", "r": "(the adapter rank)",
              "h": "(the query MLP's hidden width)"}


def check_positive_sizes(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Sequence[Dim]],
                         sizes: Mapping[str, int]) -> None:
    """Every size in SIZE_NAMES must be >= 1; the error names the first tensor that carries it."""
    for sym, what in SIZE_NAMES.items():
        if sizes.get(sym, 1) >= 1:
            continue
        name = next(n for n in tensors if sym in spec[n])
        raise ValueError(f"{name} must have {sym} >= 1 {what}, got shape {_fmt(tensors[name].shape)} "
                         f"({_fmt(spec[name])})")


def check_oca_args(x, a, c, gate, orth: str) -> Dict[str, int]:
    check_orth(orth)
    tensors = {"x": x, "a": a, "c": c, "gate": gate}
    for name, t in tensors.items():
        check_float(name, t)
    spec = {"x": ("B", "N", "d"), "a": ("B", "d", "M"), "c": ("B", "M", "d"), "gate": ()}
    sizes = check_shapes(tensors, spec, {})
    check_nonempty(x)
    check_positive_sizes(tensors, spec, sizes)
    check_same_device(tensors)
    return sizes


def check_mask(mask: Optional[torch.Tensor], x: torch.Tensor, rows: Optional[bool] = None) -> None:
    """Shape, dtype and device of the key mask, and that every sample has a valid position.

    The row check: rows=True reads the mask on the host (a ValueError naming the samples; on a GPU
    it waits for the mask); rows=False skips it; rows=None (the default) checks without a host
    sync: on the host for a CPU mask, and on a GPU with `torch._assert_async`, which fails at a
    later kernel launch (a device-side assert) instead of stalling the launch queue now."""
    if mask is None:
        return
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = f"{mask.dtype} with shape {_fmt(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = attend) of shape {_fmt(x.shape[:2])}, got {got}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask must have shape (B, N) = {_fmt(x.shape[:2])} to match x {_fmt(x.shape)}, "
                         f"got {_fmt(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    if rows is False:
        return
    if rows is None and mask.device.type != "cpu":  # a GPU's (or any device's but the host's)
        torch._assert_async(mask.any(dim=1).all(), f"nearl: mask of shape {_fmt(mask.shape)} has a row with no "
                            "valid position; the query update would read nothing")
        return
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"mask of shape {_fmt(mask.shape)} has rows with no valid position "
                         f"(samples {empty[:8].tolist()}): the query update would read nothing")


def check_layer_args(x, q, params: Mapping, mask, orth: str, check_mask_rows: Optional[bool] = None
                     ) -> Dict[str, int]:
    """Checks for nearl_layer; returns the sizes B, N, d, M, D, r, h, H."""
    check_orth(orth)
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of tensor names to tensors, got {type(params).__name__}")
    missing = [k for k in LAYER_PARAM_SHAPES if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; it has {sorted(params)}")
    unknown = sorted(str(k) for k in params if k not in LAYER_PARAM_SHAPES and k != "heads")
    if unknown:  # a misspelt key ('head') would otherwise be ignored and its default used
        raise ValueError(f"params has unknown key(s) {unknown}; the known ones are "
                         f"{sorted([*LAYER_PARAM_SHAPES, 'heads'])}")
    tensors = {"x": check_float("x", x), "q": check_float("q", q)}
    tensors.update({f"params[{k!r}]": check_float(f"params[{k!r}]", params[k]) for k in LAYER_PARAM_SHAPES})
    if x.dim() != 3:
        raise ValueError(f"x must have 3 dimensions (B, N, d), got shape {_fmt(x.shape)}")
    check_nonempty(x)
    q_spec = ("M", "D") if q.dim() == 2 else ("B", "M", "D")
    spec = {"x": ("B", "N", "d"), "q": q_spec}
    spec.update({f"params[{k!r}]": v for k, v in LAYER_PARAM_SHAPES.items()})
    sizes = check_shapes(tensors, spec, {})
    check_positive_sizes(tensors, spec, sizes)
    heads = params.get("heads", 4)
    if isinstance(heads, torch.Tensor) or not isinstance(heads, int) or heads < 1 or sizes["D"] % heads:
        raise ValueError(f"params['heads'] must be a positive int dividing the query width D={sizes['D']}, got {heads!r}")
    sizes["H"] = heads
    check_same_device(tensors)
    check_mask(mask, x, rows=check_mask_rows)
    return sizes
