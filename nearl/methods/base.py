"""What every comparison method shares: a frozen open_clip backbone behind NEARLCLIP's interface.

The training loop (nearl/train.py), the evaluation (nearl/evaluate.py) and the checkpoints only
call what NEARLCLIP offers: forward(images, tokens) -> NEARLOutput, image_tower / text_tower ->
TowerResult, encode_image / encode_text, logit_scale, the trainable-parameter helpers, the
parameter breakdown, image_transform, tokenizer, config.to_dict(), backbone, model_name, fused.
`MethodModel` provides all of that; a method only says how its features are computed and which
parameters are its own. Methods without queries return None for the query fields and carry
lambda_q = 0 in their config, so NEARLLoss / ClassificationLoss reduce to the plain CLIP loss /
cross-entropy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch
from torch import nn

from nearl.model.frozen import FrozenCLIPWrapper
from nearl.model.nearl_clip import NEARLOutput, TowerResult


@dataclass
class MethodConfig:
    """Fields the shared losses read (NEARLLoss / ClassificationLoss.from_config)."""

    lambda_q: float = 0.0  # no queries: no query-alignment term
    lambda_orth: float = 0.0
    q_temperature: float = 0.07

    def to_dict(self) -> dict:
        return asdict(self)


class MethodModel(FrozenCLIPWrapper):
    """A frozen open_clip CLIP model; subclasses add their learnable parts.

    Subclasses override `_image_features` / `_text_features` (unnormalised final features) and
    `_breakdown` (rows of the parameter table), and FrozenCLIPWrapper's hooks where they differ
    (CoOp: class_prompt_tokens / prompt_tower); `tasks` lists the tasks the method applies to.
    """

    method = "?"
    tasks = ("retrieval", "classification", "multilabel")
    refusals: Dict[str, str] = {}  # {task it does not apply to: why}, said when refused

    def __init__(self, backbone: nn.Module, config: MethodConfig, *, model_name: str = "", fused: bool = False):
        super().__init__(backbone, model_name=model_name)
        self.config = config
        self.fused = False  # the fused Triton kernels exist for NEARL's layer only
        self.requested_fused = fused

    @property
    def title(self) -> str:
        return self.method

    # ----------------------------------------------------------------- features
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images, normalize=False)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(tokens, normalize=False)

    def image_tower(self, images: torch.Tensor) -> TowerResult:
        return TowerResult(self._image_features(images), None, None)

    def text_tower(self, tokens: torch.Tensor) -> TowerResult:
        return TowerResult(self._text_features(tokens), None, None)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> NEARLOutput:
        self.check_task("retrieval")
        return NEARLOutput(self.image_tower(images).features, self.text_tower(tokens).features,
                           None, None, None, self.logit_scale, self.logit_bias)

    @classmethod
    def check_task(cls, task: str) -> None:
        if task not in cls.tasks:
            why = f" ({cls.refusals[task]})" if task in cls.refusals else ""
            raise ValueError(f"method {cls.method!r} does not apply to task {task!r}{why}: it supports "
                             f"{' and '.join(cls.tasks)} only")

    # ----------------------------------------------------------------- parameters
    # decays: FrozenCLIPWrapper's (the matrices of the method's own modules) unless a method says otherwise
    def _breakdown(self) -> Dict[str, int]:
        return {}

    def parameter_breakdown(self) -> Dict[str, int]:
        rows = dict(self._breakdown())
        rows.update(super().parameter_breakdown())
        return rows
