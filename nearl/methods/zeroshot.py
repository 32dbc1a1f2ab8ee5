"""Zero-shot: the frozen CLIP, no learnable parameter; classification by prompt templates
(nearl.model.classify.TEMPLATES or --templates), retrieval by cosine similarity. Nothing is trained:
`python -m nearl.train --method zeroshot` only validates and writes a checkpoint that names it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec


@dataclass
class ZeroShotConfig(MethodConfig):
    pass


class ZeroShot(MethodModel):
    method = "zeroshot"

    def __init__(self, backbone: nn.Module, config: Optional[ZeroShotConfig] = None, **kw):
        super().__init__(backbone, config or ZeroShotConfig(), **kw)


SPEC = MethodSpec(model_cls=ZeroShot, config_cls=ZeroShotConfig,  # its aliases: nearl/methods/options.py
                  summary="the frozen CLIP with prompt templates, no training",
                  untrained_is_zero_shot=True, training_note="no training")
