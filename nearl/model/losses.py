"""The training objective of SPEC 3.2, on open_clip's ClipLoss (SigLipLoss for SigLIP backbones)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.loss import SigLipLoss
from torch import nn

from nearl.model.nearl_clip import NEARLOutput


def finish_terms(terms: Dict[str, torch.Tensor], total: torch.Tensor, orth_penalty, lambda_orth: float):
    """Add lambda_orth * mean cos^2 (orth="soft" only) and record the total as terms["loss"]."""
    if orth_penalty is not None:
        terms["orth"] = orth_penalty.float()
        total = total + lambda_orth * terms["orth"]
    terms["loss"] = total
    return terms


class NEARLLoss(nn.Module):
    """CLIP contrastive loss + lambda_q * query alignment (+ lambda_orth * mean cos^2 with orth="soft").

    Features are gathered across ranks with gradient when world_size > 1 (open_clip's ClipLoss). A
    backbone with a learned logit bias (SigLIP) is trained with its own objective, open_clip's
    SigLipLoss with that bias, under the same term name "contrastive"; the queries have no bias and
    keep the CLIP loss.
    """

    def __init__(self, lambda_q: float = 0.1, lambda_orth: float = 1.0, q_temperature: float = 0.07,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.lambda_q, self.lambda_orth, self.q_temperature = lambda_q, lambda_orth, q_temperature
        self.clip = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)
        self.siglip = SigLipLoss(rank=rank, world_size=world_size)

    def forward(self, out: NEARLOutput) -> Dict[str, torch.Tensor]:
        image = F.normalize(out.image_features.float(), dim=-1)
        text = F.normalize(out.text_features.float(), dim=-1)
        if out.logit_bias is None:
            terms = {"contrastive": self.clip(image, text, out.logit_scale.float())}
        else:
            terms = {"contrastive": self.siglip(image, text, out.logit_scale.float(), out.logit_bias.float())}
        total = terms["contrastive"]
        if self.lambda_q and out.image_queries is not None and out.text_queries is not None:
            # One adapted tower (config.towers) has queries on one side only: no alignment term then.
            qv = F.normalize(out.image_queries.float().mean(dim=1), dim=-1)
            qt = F.normalize(out.text_queries.float().mean(dim=1), dim=-1)
            terms["query_alignment"] = self.clip(qv, qt, torch.tensor(1.0 / self.q_temperature, device=qv.device))
            total = total + self.lambda_q * terms["query_alignment"]
        return finish_terms(terms, total, out.orth_penalty, self.lambda_orth)

    @classmethod
    def from_config(cls, config, rank: int = 0, world_size: int = 1) -> "NEARLLoss":
        return cls(config.lambda_q, config.lambda_orth, config.q_temperature, rank, world_size)
