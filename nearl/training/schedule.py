"""Learning-rate schedule: linear warmup, then cosine decay (a LambdaLR, so its state is a step count)."""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr multiplier at optimizer step `step` (0-based: the multiplier used by the (step+1)-th update).

    Warmup: (step + 1) / warmup for step < warmup (the first update already moves, at lr / warmup).
    Then cosine from 1 down to `min_ratio` at `total` steps; flat at `min_ratio` beyond it.
    A plain object (not a lambda) so LambdaLR.state_dict() records it and a resumed run checks it.

    A schedule changed on resume (`changed_at`) carries a ramp: for `ramp_steps` steps from
    `ramp_start` the multiplier moves linearly from `ramp_from` (the old schedule's value there) to
    this curve, so the learning rate never jumps.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, *, ramp_start: int = 0,
                 ramp_from: float = 0.0, ramp_steps: int = 0):
        if warmup < 0 or total < 1:
            raise ValueError(f"need warmup >= 0 and total >= 1, got warmup={warmup}, total={total}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)
        self.ramp_start, self.ramp_from, self.ramp_steps = int(ramp_start), float(ramp_from), int(ramp_steps)

    def curve(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        target = self.curve(step)
        done = step - self.ramp_start + 1  # the first ramped update already moves 1/ramp_steps of the way
        if self.ramp_steps and 0 < done < self.ramp_steps:
            return self.ramp_from + (target - self.ramp_from) * done / self.ramp_steps
        return target

    def shape(self):
        return self.warmup, self.total, self.min_ratio

    def changed_at(self, step: int, warmup: int, total: int, min_ratio: float) -> "WarmupCosine":
        """The schedule a run resumed at `step` with a new (warmup, total, min_ratio) follows: warmup +
        cosine over the new total, as if the run had started with it, reached from this schedule's
        current multiplier by a linear ramp over max(1, warmup) steps. An exhausted schedule (a
        finished run given a larger --max-steps) thus warms up again from its floor instead of
        staying at it; a run stopped mid-way moves smoothly onto the longer (or shorter) cosine."""
        return WarmupCosine(warmup, total, min_ratio, ramp_start=step, ramp_from=self(step),
                            ramp_steps=max(1, warmup))

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "WarmupCosine":
        """The schedule a LambdaLR state_dict recorded (its `lr_lambdas` entry)."""
        keys = ("ramp_start", "ramp_from", "ramp_steps")
        return cls(state["warmup"], state["total"], state.get("min_ratio", 0.0),
                   **{k: state[k] for k in keys if k in state})


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR with WarmupCosine; call `.step()` once after each optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
