"""open_clip's TimmModel around a timm SwinTransformer (swin_base_patch4_window7_224), stepped as
SwinTransformer.forward_features runs it, on timm_stages.py: the patch embedding, the stages in
`layers`, the last one's PatchMerging; its blocks on NHWC maps (timm's layout: windows, shifts and
their masks stay inside the blocks); then `norm` and timm's head. Its blocks are pre-norm residual
(windowed attention, then an MLP per token), so ALTA's adapters go into them as into a ViT's."""
from __future__ import annotations

import torch

from nearl.towers.base import PreNormParts
from nearl.towers.timm_stages import TimmStagedTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
except ImportError:  # pragma: no cover
    SwinTransformer = SwinTransformerBlock = None


class TimmSwin(TimmStagedTower):
    type_name = "open_clip TimmModel around a timm SwinTransformer"
    trunk_class = SwinTransformer
    stages_name = "layers"
    channels_last = True

    def trunk_stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.patch_embed(images)

    def after_stages(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm(fmap)

    def prenorm_parts(self, k: int) -> PreNormParts:
        blk = self._blocks[k]
        if type(blk) is not SwinTransformerBlock:
            raise ValueError(f"the vision tower has timm {type(blk).__name__} blocks; only timm's SwinTransformerBlock "
                             "can be split at its branches")

        def attention(x, size):  # the windows (and their shift) need the map: (H, W) is the stem's second value
            fmap = self.to_map(x, size, self.between_format)
            return self.to_tokens(blk.drop_path1(blk._attn(blk.norm1(fmap))))

        return PreNormParts(attention, blk.norm2, lambda h: blk.drop_path2(blk.mlp(h)))
