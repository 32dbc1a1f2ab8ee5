"""CLIP-Adapter (Gao et al., IJCV 2024) as a baseline: a residual bottleneck MLP on the final features.

    adapter(f) = ReLU(W_up ReLU(W_down f))        W_down: E -> E / reduction, W_up: E / reduction -> E
    f'         = alpha * adapter(f) + (1 - alpha) * f

one adapter on the image features and one on the text features (the paper adapts the image side for
classification; this project adapts both so the same method also serves image-text retrieval),
alpha = 0.2, reduction = 4, no biases, as in the published code. The backbone is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from nearl.model.frozen import count
from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec


@dataclass
class CLIPAdapterConfig(MethodConfig):
    alpha: float = 0.2  # residual ratio: how much of the adapted feature is mixed in
    reduction: int = 4

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {self.reduction!r}")


class FeatureAdapter(nn.Module):
    def __init__(self, dim: int, reduction: int):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, dim, bias=False), nn.ReLU())

    def forward(self, f: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * self.fc(f) + (1.0 - alpha) * f


class CLIPAdapter(MethodModel):
    method = "clip-adapter"

    def __init__(self, backbone: nn.Module, config: Optional[CLIPAdapterConfig] = None, **kw):
        config = config or CLIPAdapterConfig()
        super().__init__(backbone, config, **kw)
        dim = self.tower("vision").output_dim()
        self.image_adapter = FeatureAdapter(dim, config.reduction)
        self.text_adapter = FeatureAdapter(dim, config.reduction)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_adapter(super()._image_features(images), self.config.alpha)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_adapter(super()._text_features(tokens), self.config.alpha)

    def _breakdown(self) -> Dict[str, int]:
        return {"Image adapter": count(self.image_adapter.parameters()),
                "Text adapter": count(self.text_adapter.parameters())}


SPEC = MethodSpec(  # its aliases and options (--reduction, --alpha): nearl/methods/options.py
    model_cls=CLIPAdapter, config_cls=CLIPAdapterConfig,
    summary="residual bottleneck MLPs on the final features",
)
