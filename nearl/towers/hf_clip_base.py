"""What the image and text towers of a Hugging Face transformers CLIPModel / SiglipModel (and the
CLIP-like types of transformers_backbone.MODEL_TYPES) share: finding the model, the encoder's pre-norm layers stepped with the
model's own arguments (hf_layers.py), ALTA's additions inside them. hf_clip_vision.py and
hf_clip_text.py add each tower's stem, pooling and projection."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from nearl.towers.base import Tower
from nearl.towers.hf_layers import call_layer, check_prenorm_layers, prenorm_adapted_layer
from nearl.towers.transformers_backbone import MODEL_TYPES, SIGLIP_TYPES


def hf_clip_model(backbone: nn.Module) -> Optional[nn.Module]:
    """The transformers model (of MODEL_TYPES) a TransformersCLIP backbone holds, else None."""
    hf = getattr(backbone, "hf", None)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    return hf if model_type in MODEL_TYPES else None


class HFCLIPTower(Tower):
    """One tower (`tower_attr`: "vision_model" or "text_model") of a CLIPModel / SiglipModel."""

    tower_attr = "?"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.backbone = backbone
        self.hf = hf_clip_model(backbone)
        self.model = getattr(self.hf, self.tower_attr)
        self.model_type = self.hf.config.model_type
        self.siglip = self.model_type in SIGLIP_TYPES
        self._blocks = list(self.model.encoder.layers)

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

    def block(self, k: int, x: torch.Tensor, attn_mask: Any = None) -> torch.Tensor:
        return call_layer(self._blocks[k], x, attn_mask)

    def check_adapted_blocks(self) -> None:
        check_prenorm_layers(self._blocks, self.kind)

    def adapted_block(self, k, x, attn_mask, after_attention, beside_mlp):
        return prenorm_adapted_layer(self._blocks[k], x, attn_mask, after_attention, beside_mlp)
