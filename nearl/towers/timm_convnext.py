"""open_clip's TimmModel around a timm ConvNeXt (the convnext_* configurations), stepped as
ConvNeXt.forward_features runs it, on timm_stages.py: blocks on NCHW maps, then `norm_pre`, timm's
head (pooling, LayerNorm, its MLP in convnext_large_d) and open_clip's projection."""
from __future__ import annotations

import torch

from nearl.towers.timm_stages import TimmStagedTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.convnext import ConvNeXt
except ImportError:  # pragma: no cover
    ConvNeXt = None


class TimmConvNeXt(TimmStagedTower):
    type_name = "open_clip TimmModel around a timm ConvNeXt"
    trunk_class = ConvNeXt
    between_format = torch.channels_last  # its blocks permute to NHWC and back: their outputs are channels-last

    def after_stages(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm_pre(fmap)
