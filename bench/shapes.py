"""Problem sizes and inputs for the kernel benchmarks (`--kernel oca | layer`).

A `Case` holds one set of inputs in the benchmark dtype and knows how to call a provider on them,
how to clone them (fresh leaves, optionally float64 for the error reference) and how many bytes the
op must move at the least (SPEC section 5: one read of X, one write of Xout, plus the small tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from nearl.ops import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# SPEC section 2 on ViT-B-16: B 256; vision N 197, d 768; text N 77, d 512; M 16, D 128, H 4, r 32.
PRESETS = {
    "vit-b16": dict(B=256, N=197, d=768, masked=False),
    "text-b16": dict(B=256, N=77, d=512, masked=True),
}
# Without a GPU every provider runs for correctness only, at a size the Triton interpreter handles in
# seconds: the same token counts in spirit (CLS + 8x8 patches; a 77-token context), a narrow width.
CPU_PRESETS = {
    "vit-b16": dict(B=2, N=65, d=64, masked=False),
    "text-b16": dict(B=2, N=77, d=64, masked=True),
}
DEFAULTS = dict(M=16, D=128, H=4, r=32)


@dataclass
class Shape:
    name: str
    B: int
    N: int
    d: int
    M: int = 16
    D: int = 128
    H: int = 4
    r: int = 32
    masked: bool = False

    def describe(self, kernel: str) -> str:
        base = f"B={self.B} N={self.N} d={self.d} M={self.M}"
        if kernel == "layer":
            base += f" D={self.D} H={self.H} r={self.r}" + (" text-mask" if self.masked else "")
        return f"{self.name} ({base})"

    def to_dict(self) -> dict:
        return dict(name=self.name, B=self.B, N=self.N, d=self.d, M=self.M, D=self.D, H=self.H, r=self.r,
                    masked=self.masked)


def resolve_shape(preset: str, overrides: Dict[str, Optional[int]], on_gpu: bool,
                  masked: Optional[bool] = None) -> Shape:
    """The preset (shrunk on CPU), with any explicit --B/--N/--d/--M/--D/--H/--r on top."""
    table = PRESETS if on_gpu else CPU_PRESETS
    if preset not in table:
        raise ValueError(f"unknown --shape {preset!r}; choose from {sorted(table)}")
    values = dict(DEFAULTS, **table[preset])
    explicit = {k: v for k, v in overrides.items() if v is not None}
    values.update(explicit)
    if masked is not None:
        values["masked"] = masked
    name = preset if not explicit else f"{preset}+custom"
    if not on_gpu:
        name += " [cpu-size]" if not explicit else ""
    shape = Shape(name=name, **values)
    for k in ("B", "N", "d", "M", "D", "H", "r"):
        if getattr(shape, k) < 1:
            raise ValueError(f"--{k} must be >= 1, got {getattr(shape, k)}")
    if shape.D % shape.H:
        raise ValueError(f"--H={shape.H} must divide --D={shape.D}")
    return shape


def text_mask(B: int, N: int, generator: torch.Generator) -> torch.Tensor:
    """A text-style padding mask (B, N): True up to a random end-of-text position (at least 5 tokens)."""
    lo = min(5, N)
    lengths = torch.randint(lo, N + 1, (B,), generator=generator)
    lengths[0] = N  # one full-length row, as a batch of captions usually has
    return torch.arange(N)[None, :] < lengths[:, None]


def layer_params(shape: Shape, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The `params` mapping of ops.nearl_layer with realistic random values.

    Initialisation scales follow nearl/model/modules.py, except W_up (zero at init there): here it is
    random, so the OCA really adds an update and the kernels do their full work; the LayerNorm
    affines and biases are perturbed away from 1 / 0 for the same reason.
    """
    d, D, r, h = shape.d, shape.D, shape.r, 2 * shape.D

    def rn(*size, std=1.0, mean=0.0):
        return torch.randn(*size, generator=generator) * std + mean

    return {
        "w_down": rn(d, r, std=d ** -0.5), "w_up": rn(r, d, std=0.5 * r ** -0.5), "gate": torch.tensor(0.8),
        "w_ok": rn(D, r, std=D ** -0.5), "w_ov": rn(D, r, std=D ** -0.5),
        "w_k": rn(d, D, std=d ** -0.5), "w_v": rn(d, D, std=d ** -0.5),
        "w_q": rn(D, D, std=D ** -0.5), "w_o": rn(D, D, std=D ** -0.5),
        "ln_q_weight": rn(D, std=0.1, mean=1.0), "ln_q_bias": rn(D, std=0.02),
        "ln_f_weight": rn(D, std=0.1, mean=1.0), "ln_f_bias": rn(D, std=0.02),
        "mlp_w1": rn(D, h, std=D ** -0.5), "mlp_b1": rn(h, std=0.02),
        "mlp_w2": rn(h, D, std=h ** -0.5), "mlp_b2": rn(D, std=0.02),
    }


@dataclass
class Case:
    """One benchmark problem: float inputs by name (benchmark dtype), plus non-differentiable extras."""

    kernel: str  # "oca" | "layer"
    shape: Shape
    dtype: torch.dtype
    orth: str
    tensors: Dict[str, torch.Tensor]  # every float input, all differentiable
    mask: Optional[torch.Tensor] = None
    heads: int = 4
    param_names: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ inputs
    def clone(self, requires_grad: bool, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Fresh leaf copies (in `dtype` if given, e.g. float64 for the error reference)."""
        return {k: v.detach().to(dtype or v.dtype).clone().requires_grad_(requires_grad)
                for k, v in self.tensors.items()}

    def invoke(self, fn: Callable, t: Dict[str, torch.Tensor]):
        """Call a provider: fn(x, a, c, gate) for oca, fn(x, q, params, mask) for layer."""
        if self.kernel == "oca":
            return fn(t["x"], t["a"], t["c"], t["gate"])
        params = {k: t[k] for k in self.param_names}
        params["heads"] = self.heads
        return fn(t["x"], t["q"], params, self.mask)

    # ------------------------------------------------------------------ bytes
    def _bytes(self, names) -> int:
        return sum(self.tensors[k].numel() * self.tensors[k].element_size() for k in names)

    def min_bytes(self, mode: str) -> int:
        """The least traffic of one call (SPEC 5): X read + Xout write, plus the small tensors.

        bwd: X and dXout read, dX written, plus the small tensors read and their gradients written.
        fwd+bwd: the sum of the two (the backward must read X again; nothing (B, N, d)-sized can
        stay on chip between the passes).
        """
        big = self._bytes(["x"])
        small = self._bytes([k for k in self.tensors if k != "x"])
        B, N = self.shape.B, self.shape.N
        extra_out = B * N * 4 if self.orth == "soft" else 0  # cos2 (B, N) float32
        mask = self.mask.numel() if self.mask is not None else 0  # bool: one byte each
        q_out = self._bytes(["q"]) if self.kernel == "layer" else 0  # q_out written / dq_out read
        fwd = 2 * big + small + q_out + extra_out + mask
        bwd = 3 * big + 2 * small + q_out + extra_out + mask
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    BYTES_FORMULA = ("fwd: read x + write out + small inputs (+ q_out, cos2, mask); "
                     "bwd: read x + read dout + write dx + small inputs read and their grads written; "
                     "fwd+bwd: their sum")


def make_case(kernel: str, shape: Shape, dtype: torch.dtype, orth: str, device: torch.device,
              seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    B, N, d, M, D = shape.B, shape.N, shape.d, shape.M, shape.D
    # The residual stream of a ViT: roughly unit scale per channel.
    x = torch.randn(B, N, d, generator=g)
    params = layer_params(shape, g)
    q = torch.randn(B, M, D, generator=g)
    mask = text_mask(B, N, g) if shape.masked else None
    if kernel == "oca":
        # A and C as the layer forms them from the queries (so their scales are the model's).
        a, c = reference.oca_factors(q, params["w_down"], params["w_up"], params["w_ok"], params["w_ov"])
        tensors = {"x": x, "a": a, "c": c, "gate": params["gate"]}
        names: List[str] = []
    elif kernel == "layer":
        tensors = {"x": x, "q": q, **params}
        names = list(params)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    tensors = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in tensors.items()}
    return Case(kernel, shape, dtype, orth, tensors, mask.to(device) if mask is not None else None,
                shape.H, names)


def split_outputs(out) -> Tuple[torch.Tensor, ...]:
    """A provider's result as a tuple of tensors: (out,), (out, cos2), (x_out, q_out[, cos2])."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def gb(nbytes: float) -> float:
    return nbytes / 1e9


def fmt_bytes(nbytes: float) -> str:
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"


__all__ = ["DTYPES", "PRESETS", "CPU_PRESETS", "Shape", "Case", "resolve_shape", "make_case", "text_mask",
           "layer_params", "split_outputs", "gb", "fmt_bytes"]
