"""The image tower of a Hugging Face transformers CLIPModel or SiglipModel
(nearl/transformers_backbone.py), stepped as its own forward runs it: the patch and position
embeddings (and CLIP's pre_layrnorm), the encoder's layers, post_layernorm, then CLIP's class-token
pooling and visual_projection, or SigLIP's attention-pooling head (its output is the feature)."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from .base import Tower
from .hf_layers import call_layer, check_prenorm_layers, first_layer_inputs, prenorm_adapted_layer


def hf_clip_model(backbone: nn.Module) -> Optional[nn.Module]:
    """The transformers CLIPModel / SiglipModel a TransformersCLIP backbone holds, else None."""
    hf = getattr(backbone, "hf", None)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    return hf if model_type in ("clip", "siglip") else None


class HFCLIPVision(Tower):
    kind = "vision"
    type_name = "transformers CLIPModel / SiglipModel image tower"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.backbone = backbone
        self.hf = hf_clip_model(backbone)
        self.model = self.hf.vision_model
        self.siglip = self.hf.config.model_type == "siglip"
        self._blocks = list(self.model.encoder.layers)
        if self.siglip and not getattr(self.model, "use_head", True):
            raise ValueError("this SiglipModel's image tower has no pooling head (vision_use_head=False): "
                             "it gives no image feature to adapt")

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        return hf_clip_model(backbone) is not None

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        return f"{type(backbone).__name__}, not a transformers CLIPModel / SiglipModel"

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def blocks(self) -> List[nn.Module]:
        return self._blocks

    @property
    def image_size(self) -> Tuple[int, int]:
        size = int(self.model.config.image_size)
        return size, size

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.backbone.preprocess_cfg)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return first_layer_inputs(lambda: self.model(pixel_values=images), self._blocks[0])

    def block(self, k: int, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        return call_layer(self._blocks[k], x, attn_mask)

    def check_adapted_blocks(self) -> None:
        check_prenorm_layers(self._blocks, self.kind)

    def adapted_block(self, k, x, attn_mask, after_attention, beside_mlp):
        return prenorm_adapted_layer(self._blocks[k], x, attn_mask, after_attention, beside_mlp)

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.siglip:
            return self.model.head(self.model.post_layernorm(x))
        return self.model.post_layernorm(x[:, 0, :])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.siglip else self.hf.visual_projection(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        """CLIP's visual_projection; SigLIP has none after its pooling head."""
        return [] if self.siglip else list(self.hf.visual_projection.parameters())
