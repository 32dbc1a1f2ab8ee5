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

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..model import NEARLOutput, TowerResult
from ..modules import count


@dataclass
class MethodConfig:
    """Fields the shared losses read (NEARLLoss / ClassificationLoss.from_config)."""

    lambda_q: float = 0.0  # no queries: no query-alignment term
    lambda_orth: float = 0.0
    q_temperature: float = 0.07

    def to_dict(self) -> dict:
        return asdict(self)


class MethodModel(nn.Module):
    """A frozen open_clip CLIP model; subclasses add their learnable parts.

    Subclasses override `_image_features` / `_text_features` (unnormalised final features) and
    `_breakdown` (rows of the parameter table); `tasks` lists the tasks the method applies to.
    """

    method = "?"
    tasks = ("retrieval", "classification")

    def __init__(self, backbone: nn.Module, config: MethodConfig, *, model_name: str = "", fused: bool = False):
        super().__init__()
        self.config = config
        self.model_name = model_name
        self.fused = False  # the fused Triton kernels exist for NEARL's layer only
        self.requested_fused = fused
        self.backbone = backbone.requires_grad_(False).eval()

    # ----------------------------------------------------------------- frozen backbone
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # dropout and friends stay off, whatever the learnable parts do
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale.detach().exp()

    # ----------------------------------------------------------------- features
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)

    def _text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(tokens)

    def image_tower(self, images: torch.Tensor) -> TowerResult:
        return TowerResult(self._image_features(images), None, None)

    def text_tower(self, tokens: torch.Tensor) -> TowerResult:
        return TowerResult(self._text_features(tokens), None, None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_tower(images).features
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_tower(tokens).features
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> NEARLOutput:
        self.check_task("retrieval")
        return NEARLOutput(self.image_tower(images).features, self.text_tower(tokens).features,
                           None, None, None, self.logit_scale)

    @classmethod
    def check_task(cls, task: str) -> None:
        if task not in cls.tasks:
            raise ValueError(f"method {cls.method!r} does not apply to task {task!r}: it supports "
                             f"{' and '.join(cls.tasks)} only")

    # ----------------------------------------------------------------- parameters
    def trainable_parameters(self):
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable_parameters(self) -> int:
        return count(self.trainable_parameters())

    def decays(self, name: str, p: torch.Tensor) -> bool:
        """AdamW weight decay for this learnable tensor? (matrices of the method's own modules)."""
        return p.ndim >= 2 and not name.startswith("backbone.")

    def _breakdown(self) -> Dict[str, int]:
        return {}

    def parameter_breakdown(self) -> Dict[str, int]:
        rows = dict(self._breakdown())
        rows["Total learnable"] = self.num_trainable_parameters()
        rows["Frozen backbone"] = count(p for p in self.backbone.parameters() if not p.requires_grad)
        return rows

    def format_parameter_breakdown(self) -> str:
        rows = self.parameter_breakdown()
        width = max(len(k) for k in rows)
        lines = [f"{self.method} parameters ({self.model_name or type(self.backbone).__name__})"]
        lines += [f"  {k:<{width}}  {v:>12,}" for k, v in rows.items()]
        return "\n".join(lines)

    def print_parameter_breakdown(self) -> None:
        print(self.format_parameter_breakdown())

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"{self.method} state does not match this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        self.load_state_dict(state, strict=False)

    # ----------------------------------------------------------------- data helpers
    def image_transform(self, train: bool = False):
        from open_clip.transform import PreprocessCfg, image_transform_v2
        return image_transform_v2(PreprocessCfg(**self.backbone.visual.preprocess_cfg), is_train=train)

    def tokenizer(self):
        return open_clip.get_tokenizer(self.model_name)

