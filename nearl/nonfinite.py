"""NaN and inf in a model's state: found, named, and never mistaken for a result."""
from __future__ import annotations

from typing import List, Mapping

import torch

from .errors import UserError


class NonFiniteError(UserError):
    """Training produced NaN or inf (loss, gradients, parameters or outputs); nothing broken was saved."""


def nonfinite_tensors(state: Mapping[str, object]) -> List[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an inf."""
    return [name for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_state(state: Mapping[str, object], what: str) -> None:
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} of {len(state)} parameter tensors hold NaN or inf "
                             f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); not written")
