"""open_clip's ModifiedResNet (the RN50 family), stepped as its forward runs it, on feature_map_base.py:
the stem is its three-convolution stem, layer1-3 and layer4's first Bottleneck (the one that halves
the resolution and doubles the width); the blocks are layer4's other Bottlenecks, on NCHW maps of
width 32 x `width` (2048 in RN50); the pooling is its AttentionPool2d, which ends with the projection."""
from __future__ import annotations

from typing import List, Tuple

import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from nearl.towers.base import visual_found
from nearl.towers.feature_map_base import FeatureMapTower


class OpenClipResNet(FeatureMapTower):
    type_name = "open_clip ModifiedResNet (RN50...)"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.visual = backbone.visual
        self._entry, *self._blocks = list(self.visual.layer4)
        self._width = int(self._entry.bn3.num_features)

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        return isinstance(getattr(backbone, "visual", None), ModifiedResNet)

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        return visual_found(backbone)

    @property
    def image_size(self) -> Tuple[int, int]:
        size = self.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.visual.preprocess_cfg)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        return self._entry(v.layer3(v.layer2(v.layer1(v.stem(images)))))

    def finish(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.visual.attnpool(fmap)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled  # the attention pooling's c_proj is the projection

    def projection_parameters(self) -> List[nn.Parameter]:
        return list(self.visual.attnpool.c_proj.parameters())

    def output_dim(self) -> int:
        return int(self.visual.output_dim)
