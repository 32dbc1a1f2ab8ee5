"""open_clip's TimmModel around a timm VisionTransformer (BiomedCLIP's image tower), stepped as
timm's forward_features and forward_head and open_clip's head run it: patch embedding, `_pos_embed`,
`patch_drop`, `norm_pre`, the blocks, `norm`, the pooling and fc_norm of `forward_head`, then the
open_clip head (the projection; timm_base.py). Other timm architectures without a tower type stop
with an error naming the class."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nearl.towers.base import PreNormParts
from nearl.towers.timm_base import TimmTrunkTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.vision_transformer import Block, VisionTransformer
except ImportError:  # pragma: no cover
    VisionTransformer = Block = None


class TimmVision(TimmTrunkTower):
    type_name = "open_clip TimmModel around a timm VisionTransformer"
    trunk_class = VisionTransformer

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
