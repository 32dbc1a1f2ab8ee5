"""What the tower types around a timm image trunk share: open_clip's TimmModel holding a timm
`trunk` (of the subclass's `trunk_class`) and its own `head`. The features come out as timm's
forward_head and open_clip's head make them: the trunk's final `norm`, its pooling, fc_norm and
(reset) head, then open_clip's head (the projection). timm_vision.py (VisionTransformer),
timm_eva.py (Eva) and timm_relpos.py (VisionTransformerRelPos) add the stem and the blocks."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from nearl.towers.base import Tower, visual_found

try:  # timm comes with open_clip; without it there is simply no tower of these types
    from open_clip.timm_model import TimmModel
except ImportError:  # pragma: no cover
    TimmModel = None


def stepped_trunks() -> List[str]:
    """The names of the timm trunk classes the tower types step, sorted (from the subclasses loaded)."""
    found, todo = set(), list(TimmTrunkTower.__subclasses__())
    while todo:
        sub = todo.pop()
        todo += sub.__subclasses__()
        if sub.trunk_class is not None:
            found.add(sub.trunk_class.__name__)
    return sorted(found)


class TimmTrunkTower(Tower):
    kind = "vision"
    trunk_class: Optional[type] = None  # the timm class a subclass steps (None: timm is missing)

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.visual = backbone.visual
        self.trunk = self.visual.trunk
        self._blocks = self.find_blocks()

    def find_blocks(self) -> List[nn.Module]:
        """The blocks the tower steps (timm_stages.py: the last stage's)."""
        return list(self.trunk.blocks)

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        visual = getattr(backbone, "visual", None)
        if TimmModel is None or cls.trunk_class is None or not isinstance(visual, TimmModel):
            return False
        # attention pooling (abs_attn / rot_attn) works on a 2-D feature map, not on tokens
        return isinstance(visual.trunk, cls.trunk_class) and "pool" not in dict(visual.head.named_children())

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        # every timm type says the same of a trunk none of them steps, so the factory says it once
        visual = getattr(backbone, "visual", None)
        if TimmModel is not None and isinstance(visual, TimmModel):
            if cls.trunk_class is None or not isinstance(visual.trunk, cls.trunk_class):
                return (f"a TimmModel around timm's {type(visual.trunk).__name__}, a trunk no tower type steps "
                        f"(they step {', '.join(stepped_trunks())})")
            return "a TimmModel with attention pooling over a feature map"
        return visual_found(backbone)

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

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.trunk.forward_head(self.trunk.norm(x))  # timm's pooling, fc_norm and (reset) head

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual.head(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        return list(self.visual.head.parameters()) + list(self.trunk.head.parameters())
