"""open_clip's TimmModel around a timm VisionTransformer (BiomedCLIP's image tower), stepped as
timm's forward_features and forward_head and open_clip's head run it: patch embedding, `_pos_embed`,
`patch_drop`, `norm_pre`, the blocks, `norm`, the pooling and fc_norm of `forward_head`, then the
open_clip head (the projection). Other timm architectures stop with an error naming the class."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .base import PreNormParts, Tower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from open_clip.timm_model import TimmModel
    from timm.models.vision_transformer import Block, VisionTransformer
except ImportError:  # pragma: no cover
    TimmModel = VisionTransformer = Block = None


class TimmVision(Tower):
    kind = "vision"
    type_name = "open_clip TimmModel around a timm VisionTransformer"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.visual = backbone.visual
        self.trunk = self.visual.trunk
        self._blocks = list(self.trunk.blocks)

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        visual = getattr(backbone, "visual", None)
        if TimmModel is None or not isinstance(visual, TimmModel):
            return False
        # attention pooling (abs_attn / rot_attn) works on a 2-D feature map, not on tokens
        return isinstance(visual.trunk, VisionTransformer) and "pool" not in dict(visual.head.named_children())

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        visual = getattr(backbone, "visual", None)
        if TimmModel is not None and isinstance(visual, TimmModel):
            if not isinstance(visual.trunk, VisionTransformer):
                return f"a TimmModel around timm's {type(visual.trunk).__name__}, which is not a VisionTransformer"
            return "a TimmModel with attention pooling over a feature map"
        return f"an image tower of type {type(visual).__name__}" if visual is not None else "no `visual` image tower"

    @property
    def width(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def blocks(self) -> List[nn.Module]:
        return self._blocks

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.visual.preprocess_cfg)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(images)))), None

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._blocks[k](x)  # timm's stack is batch-first

    def prenorm_parts(self, k: int) -> PreNormParts:
        blk = self._blocks[k]
        if type(blk) is not Block:
            raise ValueError(f"the vision tower has timm {type(blk).__name__} blocks; only timm's Block can be split "
                             "at its branches")
        return PreNormParts(lambda x, attn_mask=None: blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x)))),
                            blk.norm2, lambda h: blk.drop_path2(blk.ls2(blk.mlp(h))))

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.norm(x))  # timm's pooling, fc_norm and (reset) head

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual.head(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        return list(self.visual.head.parameters()) + list(self.trunk.head.parameters())
