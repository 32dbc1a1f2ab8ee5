"""open_clip's TimmModel around a timm FastVit (MobileCLIP's and MobileCLIP2's fastvit_mci0-4), stepped
as FastVit.forward_features runs it, on timm_stages.py: the last stage's entry is its PatchEmbed and
its conditional positional encoding; its blocks (attention blocks in every MCi) on NCHW maps; then
`final_conv`, which widens the map, and timm's head (pooling and the projection, timm's `fc`)."""
from __future__ import annotations

import torch
from torch import nn

from nearl.towers.timm_stages import TimmStagedTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.fastvit import FastVit
except ImportError:  # pragma: no cover
    FastVit = None


class TimmFastViT(TimmStagedTower):
    type_name = "open_clip TimmModel around a timm FastVit (MobileCLIP)"
    trunk_class = FastVit

    def stage_entry(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stage.pos_emb(stage.downsample(x))

    def after_stages(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.trunk.final_conv(fmap)
