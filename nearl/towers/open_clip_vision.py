"""open_clip's VisionTransformer, stepped as open_clip runs it: `_embeds`, the resblocks, `_pool`,
`proj`."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from nearl.towers.base import PreNormParts, Tower, visual_found
from nearl.towers.open_clip_blocks import prenorm_parts, run_block


class OpenClipVision(Tower):
    kind = "vision"
    type_name = "open_clip VisionTransformer"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.visual = backbone.visual
        self._blocks = list(self.visual.transformer.resblocks)

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        return isinstance(getattr(backbone, "visual", None), VisionTransformer)

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        return visual_found(backbone)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def blocks(self) -> List[nn.Module]:
        return self._blocks

    @property
    def image_size(self) -> Tuple[int, int]:
        size = self.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocessing settings for this tower (mean, std, size, interpolation...)."""
        return dict(self.visual.preprocess_cfg)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.visual._embeds(images), None

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_block(self._blocks[k], x, self.visual.transformer.batch_first, attn_mask)

    def prenorm_parts(self, k: int) -> PreNormParts:
        return prenorm_parts(self._blocks[k], self.visual.transformer.batch_first, self.kind)

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def projection_parameters(self) -> List[nn.Parameter]:
        return [self.visual.proj] if self.visual.proj is not None else []

    def output_dim(self) -> int:
        if isinstance(self.visual.proj, torch.Tensor):
            return int(self.visual.proj.shape[1])
        return super().output_dim()


