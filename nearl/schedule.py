"""Learning-rate schedule: linear warmup, then cosine decay (a LambdaLR, so its state is a step count)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr multiplier at optimizer step `step` (0-based: the multiplier used by the (step+1)-th update).

    Warmup: (step + 1) / warmup for step < warmup (the first update already moves, at lr / warmup).
    Then cosine from 1 down to `min_ratio` at `total` steps; flat at `min_ratio` beyond it.
    A plain object (not a lambda) so LambdaLR.state_dict() records it and a resumed run checks it.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        if warmup < 0 or total < 1:
            raise ValueError(f"need warmup >= 0 and total >= 1, got warmup={warmup}, total={total}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR with WarmupCosine; call `.step()` once after each optimizer step."""
    return LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
