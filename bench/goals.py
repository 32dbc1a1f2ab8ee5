"""The performance goals the issues set, as data, and their verdicts from the benchmarks' JSON.

Each goal names the step whose payload holds its numbers (a `bench.run --out` JSON), a function
that takes the ratio out of that payload (or says why it cannot), and the bound. A new provider
(e.g. `split`) is one more line in KERNEL_GOALS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

class Missing(Exception):
    """A number a goal needs is not in the payload; the message says why."""


# ------------------------------------------------------------------------------ kernel payloads
def kernel_row(payload: dict, provider: str, mode: str) -> dict:
    """The eager row of a provider and mode (the goals are set on eager calls; --cuda-graphs rows aside)."""
    for row in payload.get("rows", []):
        if row["provider"] == provider and row["mode"] == mode and not row.get("graph"):
            if row["status"] != "ok":
                raise Missing(f"{provider} {mode} {row['status']}: {row.get('reason')}")
            return row
    raise Missing(f"no {provider} {mode} row")


def speedup_over(over: str, mode: str, provider: str = "triton") -> Callable[[dict], float]:
    """median(over) / median(provider) in one mode: how many times faster the provider is."""
    def measure(payload):
        base = kernel_row(payload, over, mode)["timing"]["median_ms"]
        return base / kernel_row(payload, provider, mode)["timing"]["median_ms"]
    return measure


def copy_fraction(mode: str, provider: str = "triton") -> Callable[[dict], float]:
    def measure(payload):
        pct = kernel_row(payload, provider, mode).get("pct_copy")
        if pct is None:
            raise Missing("no copy bandwidth (measured on CUDA only)")
        return pct / 100.0
    return measure


# ------------------------------------------------------------------------------- model payload
def model_row(payload: dict, section: str, variant: str) -> dict:
    for row in payload.get(section, []):
        if row["variant"] == variant:
            if row["status"] != "ok":
                raise Missing(f"{section} {variant}: {row.get('reason')}")
            return row
    raise Missing(f"no {section} {variant} row")


def train_time_vs_limit(payload):
    return model_row(payload, "train", "nearl-fused")["timing"]["median_ms"] / \
        model_row(payload, "train", "limit")["timing"]["median_ms"]


def train_peak_memory_vs_reference(payload):
    fused = model_row(payload, "train", "nearl-fused").get("peak_mib")
    ref = model_row(payload, "train", "nearl-reference").get("peak_mib")
    if not fused or not ref:
        raise Missing("no peak memory (measured on CUDA only)")
    return fused / ref


def image_throughput_vs_clip(payload):
    return model_row(payload, "inference", "nearl-fused")["images_per_s"] / \
        model_row(payload, "inference", "clip")["images_per_s"]


# ------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Goal:
    step: str  # the gpu_check step whose payload holds the numbers
    text: str
    measure: Callable[[dict], float]
    op: str  # ">=" or "<="
    target: float
    unit: str = "x"  # "x" (a ratio) or "%" (a fraction shown in per cent)

    def bound(self) -> str:
        return f"{self.op} {fmt(self.target, self.unit)}"


def fmt(value: float, unit: str) -> str:
    return f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"


# (text, measure, op, target, unit) per kernel benchmark, triton against the others.
KERNEL_GOALS = (
    ("triton forward: % of copy bandwidth", copy_fraction("fwd"), ">=", 0.60, "%"),
    ("triton forward vs reference", speedup_over("reference", "fwd"), ">=", 3.0, "x"),
    ("triton forward vs compile", speedup_over("compile", "fwd"), ">=", 1.5, "x"),
    ("triton fwd+bwd vs reference", speedup_over("reference", "fwd+bwd"), ">=", 2.5, "x"),
)
KERNEL_STEPS = ("oca-vit-b16", "layer-vit-b16", "layer-text-b16", "oca-text-b16")
MODEL_GOALS = (
    Goal("model", "fused training step / frozen backbone fwd+bwd (limit)", train_time_vs_limit, "<=", 1.10),
    Goal("model", "fused peak training memory / reference's", train_peak_memory_vs_reference, "<=", 0.8),
    Goal("model", "fused image throughput / frozen CLIP's", image_throughput_vs_clip, ">=", 0.9),
)
GOALS: Tuple[Goal, ...] = tuple(Goal(step, *g) for step in KERNEL_STEPS for g in KERNEL_GOALS) + MODEL_GOALS


def verdict(goal: Goal, payload: Optional[dict], missing_why: str, dry_run: bool) -> dict:
    """met / not met with the measured value, or not measured and why."""
    row = {"step": goal.step, "goal": goal.text, "target": goal.bound(), "measured": None}
    if payload is None:
        return dict(row, status="not measured", why=missing_why)
    try:
        value = goal.measure(payload)  # in the dry run too, so that this code cannot rot
    except Missing as err:
        value, why = None, str(err)
    if dry_run or payload.get("cpu_only"):
        return dict(row, status="not measured", why="dry run on the CPU: no GPU figure")
    if value is None:
        return dict(row, status="not measured", why=why)
    met = value >= goal.target if goal.op == ">=" else value <= goal.target
    return dict(row, measured=value, shown=fmt(value, goal.unit), status="met" if met else "not met", why="")


def evaluate(payloads: Dict[str, Optional[dict]], why_missing: Dict[str, str], dry_run: bool,
             goals: Tuple[Goal, ...] = GOALS) -> List[dict]:
    return [verdict(g, payloads.get(g.step), why_missing.get(g.step, "step not run"), dry_run) for g in goals]
