"""NaN and inf in a model's state: found, named, and never mistaken for a result."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch

from nearl.errors import UserError


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


@torch.no_grad()
def nonfinite_outputs(model, classnames: Optional[Sequence[str]] = None,
                      templates: Optional[Sequence[str]] = None) -> List[str]:
    """Which outputs of `model` hold NaN or inf on a fixed probe batch: its image features (a grey image
    and one of noise), its text features (two captions) and, given class names, its class logits.
    Finite weights can give such outputs (weights so large that a product overflows: a diverged run)."""
    from nearl.model.classify import TEMPLATES, classification_logits

    device = next(model.parameters()).device
    size = tuple(model.tower("vision").image_size)
    noise = torch.randn(3, *size, generator=torch.Generator().manual_seed(0))
    images = torch.stack([torch.zeros(3, *size), noise]).to(device)
    tokens = model.tokenizer()(["a medical image.", "a chest x-ray"]).to(device)
    was_training = model.training
    model.eval()
    try:
        image = model.encode_image(images).float()
        outputs = {"image features": image, "text features": model.encode_text(tokens).float()}
        if classnames:
            outputs["class logits"] = classification_logits(model, image, list(classnames),
                                                            list(templates or TEMPLATES), device=device)
    finally:
        model.train(was_training)
    return [name for name, t in outputs.items() if not bool(torch.isfinite(t).all())]
