"""BiomedCoOp's training objective (nearl/methods/biomedcoop.py says where each number comes from).

The teacher is the frozen text encoder's features of each class's P descriptions, T (C, P, E), each
normalised. With the learned prompts' unit class features W (C, E), unit image features f (B, E),
s = logit_scale and the student logits z = s f Wᵀ:

    cross_entropy  CE(z, y)
    sccm           MSE(W, normalise(mean_p T[:, p]))                 every description (the code's SCCM)
    kdsp           Σ KL(softmax(s f Sᵀ) ‖ softmax(z)) / (B·C)        S: the mean of the kept descriptions
    loss           cross_entropy + sccm_lambda · sccm + kdsp_lambda · kdsp

The terms are recorded unweighted (as query_alignment is), the weights enter `loss` only. Kept
descriptions (the code's selective prompting): description p scores score_p = mean over the batch of
max over classes of s f T[:, p]ᵀ; the code turns the scores into z = (score − median) / MAD and keeps
the p with |z − mean z| / std z ≤ tau. The median and the MAD cancel in that standardisation, so it is
|score − mean score| / std score ≤ tau (std with Bessel's correction, as torch.std), computed so here;
where the code divides by a zero MAD or std (it then gets NaN) every description is kept, and so
where no description would be. The image tower is frozen, so the zero-shot image features the code
takes from a second copy of it are f itself. Computed per process on its own batch.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from nearl.model.classify import ClassificationLoss, PromptClassifier, class_embeddings


class BiomedCoOpOutput(NamedTuple):
    logits: torch.Tensor  # (B, C) logit_scale * cos(image, class)
    image_queries: Optional[torch.Tensor]  # None: no queries (ClassificationLoss reads these three)
    class_queries: Optional[torch.Tensor]
    orth_penalty: Optional[torch.Tensor]
    image_features: torch.Tensor  # (B, E) unit
    class_features: torch.Tensor  # (C, E) unit, the learned prompts'
    logit_scale: torch.Tensor


class BiomedCoOpClassifier(PromptClassifier):
    """PromptClassifier that also hands the loss the unit image and class features."""

    def forward(self, images: torch.Tensor) -> BiomedCoOpOutput:
        image = self.model.image_tower(images)
        classes = class_embeddings(self.model.prompt_tower(self.prompt_tokens).features, self.num_classes)
        logits = self.model.class_logits(image.features, classes)
        return BiomedCoOpOutput(logits, None, None, None, F.normalize(image.features.float(), dim=-1), classes,
                                self.model.logit_scale.float())


def kept_prompts(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """(P,) bool: the descriptions whose standardised score is within tau of the mean (module doc)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if scores.numel() < 2:
        return keep
    z = (scores - scores.mean()) / scores.std()
    chosen = z.abs() <= tau
    return chosen if bool(torch.isfinite(z).all()) and bool(chosen.any()) else keep


class BiomedCoOpLoss(ClassificationLoss):
    def __init__(self, teacher: torch.Tensor, sccm_lambda: float, kdsp_lambda: float, tau: float,
                 rank: int = 0, world_size: int = 1):
        super().__init__(lambda_q=0.0, lambda_orth=0.0, rank=rank, world_size=world_size)
        self.sccm_lambda, self.kdsp_lambda, self.tau = sccm_lambda, kdsp_lambda, tau
        self.teacher = F.normalize(teacher.float(), dim=-1)  # (C, P, E)
        self.teacher_mean = F.normalize(self.teacher.mean(dim=1), dim=-1)  # (C, E)

    @torch.no_grad()
    def zero_shot_logits(self, image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(B, C) s f Sᵀ, S the normalised mean of the kept descriptions of each class."""
        with torch.autocast(image.device.type, enabled=False):
            image, teacher = image.float(), self.teacher.to(image.device)
            scores = (scale * torch.einsum("be,cpe->bcp", image, teacher)).amax(dim=1).mean(dim=0)  # (P,)
            kept = F.normalize(teacher[:, kept_prompts(scores, self.tau)].mean(dim=1), dim=-1)
            return scale * image @ kept.T

    def forward(self, out: BiomedCoOpOutput, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        terms = super().forward(out, labels)  # cross_entropy, loss
        terms["sccm"] = F.mse_loss(out.class_features.float(), self.teacher_mean.to(out.class_features.device))
        logits = out.logits.float()
        target = F.log_softmax(self.zero_shot_logits(out.image_features.detach(), out.logit_scale), dim=1)
        terms["kdsp"] = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum",
                                 log_target=True) / logits.numel()
        terms["loss"] = terms["loss"] + self.sccm_lambda * terms["sccm"] + self.kdsp_lambda * terms["kdsp"]
        return terms
