"""What the tower types around a staged timm trunk share (ConvNeXt, Swin, FastViT; open_clip's
TimmModel holding it): the stem is the trunk's own stem and every stage but the last, then the last
stage's entry (its downsampling, FastViT's positional convolution); the blocks are the last stage's
blocks (one width: timm's feature_info of that stage); after them come what the trunk's
forward_features applies after its stages (`after_stages`), timm's forward_head and open_clip's head,
as in timm_base.py. timm_convnext.py, timm_swin.py and timm_fastvit.py say where these parts are."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from nearl.towers.feature_map_base import FeatureMapTower
from nearl.towers.timm_base import TimmTrunkTower


class TimmStagedTower(FeatureMapTower, TimmTrunkTower):
    stages_name = "stages"  # the trunk's attribute holding its stages

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self._width = int(self.trunk.feature_info[len(self.stages) - 1]["num_chs"])

    @property
    def stages(self) -> List[nn.Module]:
        return list(getattr(self.trunk, self.stages_name))

    def find_blocks(self) -> List[nn.Module]:
        return list(self.stages[-1].blocks)

    def trunk_stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.stem(images)

    def stage_entry(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stage.downsample(x)

    def after_stages(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        *before, last = self.stages
        x = self.trunk_stem(images)
        for stage in before:
            x = stage(x)
        return self.stage_entry(last, x)

    def finish(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_head(self.after_stages(fmap))  # timm's pooling, norm and (reset) head
