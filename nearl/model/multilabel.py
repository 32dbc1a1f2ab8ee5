"""Multi-label scoring (--task multilabel): positive against negative prompts, class by class.

Each class c has a positive prompt set (the templates, nearl.model.classify.TEMPLATES or --templates,
filled with c) and a negative one (NEGATIVE_TEMPLATES filled with c, e.g. "a medical image with no
effusion."), each ensembled as classification's are (normalise, mean over the templates, normalise).
Its logit is

    z_c = logit_scale * cos(image, pos_c) - logit_scale * cos(image, neg_c)

and its probability p_c = sigmoid(z_c), the softmax over (pos_c, neg_c) of logit_scale * cos (CheXzero's
scoring): no threshold is fitted. Both prompt sets go through the model's class prompt hooks
(class_prompt_tokens, prompt_tower, class_logits of FrozenCLIPWrapper), so a method inherits the scoring.

Training: binary cross-entropy with logits over the (B, C) z_c against the multi-hot targets (the mean over
images and classes), plus lambda_q times a multi-positive query alignment (`multilabel_query_alignment`)
for models with queries, plus the soft orthogonality penalty as classification's.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nearl.model.classify import (TEMPLATES, ClassificationLoss, ClassifierOutput, class_embeddings, class_queries,
                                  classification_logits)

NEGATIVE_TEMPLATES = (
    "a medical image with no {}.",
    "no {}.",
    "{} is absent.",
    "a radiology image showing no {}.",
)
SCORING = ("per class c: p_c = sigmoid(logit_scale * (cos(image, positive prompts of c) - cos(image, negative "
           "prompts of c))), the positive prompts the templates filled with c, the negative ones "
           "NEGATIVE_TEMPLATES ('a medical image with no {c}.', ...)")


def multilabel_prompt_tokens(model, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES,
                             negatives: Sequence[str] = NEGATIVE_TEMPLATES) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) token ids of the class prompts, class-major, through model.class_prompt_tokens."""
    return model.class_prompt_tokens(classnames, templates), model.class_prompt_tokens(classnames, negatives)


class MultiLabelClassifier(nn.Module):
    """A model + its positive and negative class prompts as one module: forward(images) -> ClassifierOutput
    whose logits are the (B, C) z_c of the module's docstring (class_queries: the positive prompts')."""

    def __init__(self, model: nn.Module, positive: torch.Tensor, negative: torch.Tensor, num_classes: int):
        super().__init__()
        for name, tokens in (("positive", positive), ("negative", negative)):
            if tokens.shape[0] % num_classes:
                raise ValueError(f"{tokens.shape[0]} {name} prompts do not split into {num_classes} classes")
        self.model, self.num_classes = model, num_classes
        self.register_buffer("positive", positive, persistent=False)
        self.register_buffer("negative", negative, persistent=False)

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        image = self.model.image_tower(images)
        pos, neg = self.model.prompt_tower(self.positive), self.model.prompt_tower(self.negative)
        logits = (self.model.class_logits(image.features, class_embeddings(pos.features, self.num_classes))
                  - self.model.class_logits(image.features, class_embeddings(neg.features, self.num_classes)))
        penalties = [p for p in (image.orth_penalty, pos.orth_penalty, neg.orth_penalty) if p is not None]
        penalty = torch.stack(penalties).mean() if penalties else None
        image_q = image.queries.float().mean(dim=1) if image.queries is not None else None
        class_q = class_queries(pos.queries, self.num_classes) if pos.queries is not None else None
        return ClassifierOutput(logits, image_q, class_q, penalty)


def multilabel_query_alignment(image_queries: torch.Tensor, class_q: torch.Tensor, targets: torch.Tensor,
                               temperature: float = 0.07) -> torch.Tensor:
    """classify.query_alignment with several positives: image -> class cross-entropy against its positive
    classes (equally weighted), over the images with a positive, and class -> image against the images
    holding the class, over the classes present; the two directions averaged (0 with no positive at all)."""
    sim = F.normalize(image_queries.float(), dim=-1) @ F.normalize(class_q.float(), dim=-1).T / temperature
    hot = (targets > 0.5).float()
    rows, cols = hot.sum(dim=1) > 0, hot.sum(dim=0) > 0
    if not rows.any():
        return sim.sum() * 0.0
    i2c = -((hot[rows] / hot[rows].sum(dim=1, keepdim=True)) * F.log_softmax(sim[rows], dim=1)).sum(dim=1).mean()
    per = hot.T[cols]
    c2i = -((per / per.sum(dim=1, keepdim=True)) * F.log_softmax(sim.T[cols], dim=1)).sum(dim=1).mean()
    return 0.5 * (i2c + c2i)


class MultiLabelLoss(ClassificationLoss):
    """Binary cross-entropy with logits (mean over images and classes) + lambda_q * multi-positive query
    alignment (+ lambda_orth * the orthogonality penalty with orth="soft")."""

    TERM = "binary_cross_entropy"

    def task_term(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def alignment(self, image_queries: torch.Tensor, class_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return multilabel_query_alignment(image_queries, class_q, targets, self.q_temperature)


@torch.no_grad()
def multilabel_logits(model, image_features: torch.Tensor, classnames: Sequence[str],
                      templates: Sequence[str] = TEMPLATES, *, device=None) -> torch.Tensor:
    """(n, C) z_c on the CPU for image features from model.encode_image: the model's classification_logits
    of the positive prompts minus those of the negative ones."""
    positive = classification_logits(model, image_features, classnames, templates, device=device)
    return positive - classification_logits(model, image_features, classnames, NEGATIVE_TEMPLATES, device=device)


def objective(model, classnames: Sequence[str], templates: Sequence[str], device, config, rank: int = 0,
              world_size: int = 1):
    """(the training module, its loss, the loss of one unsharded probe step) of a multilabel run."""
    positive, negative = multilabel_prompt_tokens(model, classnames, templates)
    module = MultiLabelClassifier(model, positive.to(device), negative.to(device), len(classnames)).to(device)
    return (module, MultiLabelLoss.from_config(config, rank=rank, world_size=world_size),
            MultiLabelLoss.from_config(config))
