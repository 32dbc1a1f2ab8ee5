"""The image tower of a Hugging Face transformers CLIPModel or SiglipModel, and of the other types in
nearl/towers/transformers_backbone.py's MODEL_TYPES (MetaCLIP 2, OWL-ViT, OWLv2, ChineseCLIP and AltCLIP
have CLIP's, BLIP's lacks pre_layrnorm, SigLIP 2's is SigLIP's over NaFlex patches), stepped as its own
forward runs it: the patch and position embeddings (and CLIP's pre_layrnorm), the encoder's layers,
post_layernorm, then CLIP's class-token pooling and visual_projection, or SigLIP's attention-pooling
head (its output is the feature; SigLIP 2's takes the all-ones patch mask)."""
from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from nearl.towers.hf_clip_base import HFCLIPTower
from nearl.towers.hf_layers import first_layer_inputs
from nearl.towers.transformers_backbone import image_size, patch_mask


class HFCLIPVision(HFCLIPTower):
    kind = "vision"
    type_name = "transformers CLIPModel / SiglipModel (or CLIP-like) image tower"
    tower_attr = "vision_model"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        if self.siglip and not getattr(self.model, "use_head", True):
            raise ValueError("this SiglipModel's image tower has no pooling head (vision_use_head=False): "
                             "it gives no image feature to adapt")

    @property
    def image_size(self) -> Tuple[int, int]:
        size = image_size(self.model.config)
        return size, size

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.backbone.preprocess_cfg)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return first_layer_inputs(lambda: self.model(**self._tower_inputs(images)), self._blocks[0])

    def _tower_inputs(self, images: torch.Tensor) -> dict:
        """The backbone's image inputs as the tower's forward names them (transformers 4.x's SigLIP 2
        image tower calls the patch mask attention_mask)."""
        inputs = self.backbone.image_inputs(images)
        if "pixel_attention_mask" in inputs and "pixel_attention_mask" not in self._parameters_of_forward:
            inputs["attention_mask"] = inputs.pop("pixel_attention_mask")
        return inputs

    @property
    def _parameters_of_forward(self):
        return inspect.signature(self.model.forward).parameters

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.model_type == "siglip2":
            return self.model.head(self.model.post_layernorm(x), patch_mask(x))
        if self.siglip:
            return self.model.head(self.model.post_layernorm(x))
        if self.model_type == "blip":  # BLIP normalises every token, then the class token once more
            return self.model.post_layernorm(self.model.post_layernorm(x)[:, 0, :])
        return self.model.post_layernorm(x[:, 0, :])

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled if self.siglip else self.hf.visual_projection(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        """CLIP's visual_projection; SigLIP has none after its pooling head."""
        return [] if self.siglip else list(self.hf.visual_projection.parameters())
