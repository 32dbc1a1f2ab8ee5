"""open_clip's TimmModel around a timm VisionTransformerRelPos (relative position bias in every
attention, no absolute position embedding), stepped as timm's forward_features and forward_head and
open_clip's head run it: patch embedding, the class token, the blocks, each given the shared
relative position bias when the model shares one, then the pooling and projection of timm_base.py.

The stem's second value, handed back to every block as the protocol's attention mask, is that
shared bias (None when each block keeps its own): the blocks take no other mask."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nearl.towers.base import PreNormParts
from nearl.towers.timm_base import TimmTrunkTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.vision_transformer_relpos import RelPosBlock, VisionTransformerRelPos
except ImportError:  # pragma: no cover
    VisionTransformerRelPos = RelPosBlock = None


class TimmRelPos(TimmTrunkTower):
    type_name = "open_clip TimmModel around a timm VisionTransformerRelPos"
    trunk_class = VisionTransformerRelPos

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = self.trunk
        x = t.patch_embed(images)
        if t.cls_token is not None:
            x = torch.cat((t.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x, t.shared_rel_pos.get_bias() if t.shared_rel_pos is not None else None

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._blocks[k](x, shared_rel_pos=attn_mask)  # attn_mask: the stem's shared bias

    def prenorm_parts(self, k: int) -> PreNormParts:
        blk = self._blocks[k]
        if type(blk) is not RelPosBlock:  # ResPostRelPosBlock normalises the branches' outputs
            raise ValueError(f"the vision tower has timm {type(blk).__name__} blocks; only timm's RelPosBlock can "
                             "be split at its branches")
        return PreNormParts(lambda x, bias=None: blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), shared_rel_pos=bias))),
                            blk.norm2, lambda h: blk.drop_path2(blk.ls2(blk.mlp(h))))
