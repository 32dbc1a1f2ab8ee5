"""The image tower of a Hugging Face transformers CLIPModel or SiglipModel
(nearl/transformers_backbone.py), stepped as its own forward runs it: the patch and position
embeddings (and CLIP's pre_layrnorm), the encoder's layers, post_layernorm, then CLIP's class-token
pooling and visual_projection, or SigLIP's attention-pooling head (its output is the feature)."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .hf_clip_base import HFCLIPTower
from .hf_layers import first_layer_inputs


class HFCLIPVision(HFCLIPTower):
    kind = "vision"
    type_name = "transformers CLIPModel / SiglipModel image tower"
    tower_attr = "vision_model"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        if self.siglip and not getattr(self.model, "use_head", True):
            raise ValueError("this SiglipModel's image tower has no pooling head (vision_use_head=False): "
                             "it gives no image feature to adapt")

    @property
    def image_size(self) -> Tuple[int, int]:
        size = int(self.model.config.image_size)
        return size, size

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.backbone.preprocess_cfg)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return first_layer_inputs(lambda: self.model(pixel_values=images), self._blocks[0])

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.siglip:
            return self.model.head(self.model.post_layernorm(x))
        return self.model.post_layernorm(x[:, 0, :])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.siglip else self.hf.visual_projection(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        """CLIP's visual_projection; SigLIP has none after its pooling head."""
        return [] if self.siglip else list(self.hf.visual_projection.parameters())
