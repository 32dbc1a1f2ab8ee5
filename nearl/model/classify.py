"""Prompt-based classification with NEARL-CLIP: class prompts through the adapted text tower.

A class c is represented by its prompts (one per template, e.g. "a medical image of pneumonia.");
each prompt's text feature is L2-normalised, the template features are averaged and normalised
again (CLIP's prompt ensembling). Logits are logit_scale * cos(image, class).

Training (SPEC 3.2, labelled data): cross-entropy over those logits, with the prompts going
through the adapted text tower at every step, plus lambda_q times the query alignment between each
image's final queries (mean over M) and the queries of its true class's prompts (mean over M, then
over templates). Several images of a batch share a class, so the symmetric contrastive loss of the
image-text case becomes: image -> class cross-entropy over the classes at temperature 0.07, and
class -> image cross-entropy with all the batch's images of that class as (equally weighted)
positives, for the classes present; the two directions are averaged. Distributed, the image
queries are gathered across ranks with gradient, so this term equals the single-process one over
the global batch.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nearl.model.losses import finish_terms

TEMPLATES = (
    "a medical image of {}.",
    "a photo of {}.",
    "a radiology image showing {}.",
    "an image of {}, a type of medical finding.",
)


def prompt_name(classname: str) -> str:
    """Folder-style names read better in a sentence: 'pleural_effusion' -> 'pleural effusion'."""
    return " ".join(classname.replace("_", " ").replace("-", " ").split())


def build_prompts(classnames: Sequence[str], templates: Sequence[str] = TEMPLATES) -> List[str]:
    """Prompts in class-major order: prompt c * T + t is template t filled with class c."""
    if not classnames:
        raise ValueError("no class names")
    if not templates:
        raise ValueError("no prompt templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' for the class name, got {bad}")
    return [t.format(prompt_name(c)) for c in classnames for t in templates]


def tokenize_prompts(tokenizer, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """(C * T, context_length) token ids of build_prompts."""
    return tokenizer(build_prompts(classnames, templates))


def class_embeddings(text_features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C * T, E) prompt features -> (C, E) unit class embeddings (normalise, mean over T, normalise)."""
    per = F.normalize(text_features.float(), dim=-1).reshape(num_classes, -1, text_features.shape[-1])
    return F.normalize(per.mean(dim=1), dim=-1)


def class_queries(text_queries: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C * T, M, D) final text queries of the prompts -> (C, D): mean over M, then over templates."""
    q = text_queries.float().mean(dim=1)
    return q.reshape(num_classes, -1, q.shape[-1]).mean(dim=1)


def class_prompt_tokens(model, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """The token ids of a model's class prompts (its `class_prompt_tokens`: the templates filled with
    the class names, or CoOp's learned context, one prompt per class)."""
    return model.class_prompt_tokens(classnames, templates)


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (B, C): logit_scale * cos(image, class)
    image_queries: Optional[torch.Tensor]  # (B, D): mean over M of the final Q_v (None: no queries)
    class_queries: Optional[torch.Tensor]  # (C, D)
    orth_penalty: Optional[torch.Tensor]


class PromptClassifier(nn.Module):
    """A model + fixed class prompts as one module (so DDP sees a single forward per step).

    Works for every method with NEARLCLIP's interface; methods without queries (image_tower /
    text_tower returning queries=None) give image_queries = class_queries = None."""

    def __init__(self, model: nn.Module, prompt_tokens: torch.Tensor, num_classes: int):
        super().__init__()
        if prompt_tokens.shape[0] % num_classes:
            raise ValueError(f"{prompt_tokens.shape[0]} prompts do not split into {num_classes} classes")
        self.model = model
        self.num_classes = num_classes
        self.register_buffer("prompt_tokens", prompt_tokens, persistent=False)

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        image = self.model.image_tower(images)
        text = self.model.prompt_tower(self.prompt_tokens)
        classes = class_embeddings(text.features, self.num_classes)
        logits = self.model.class_logits(image.features, classes)  # logit_scale * cos (Tip-Adapter: + its cache)
        penalties = [p for p in (image.orth_penalty, text.orth_penalty) if p is not None]
        penalty = torch.stack(penalties).mean() if penalties else None
        image_q = image.queries.float().mean(dim=1) if image.queries is not None else None
        class_q = class_queries(text.queries, self.num_classes) if text.queries is not None else None
        return ClassifierOutput(logits, image_q, class_q, penalty)


def _gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size <= 1:
        return x
    import torch.distributed.nn as dist_nn
    return torch.cat(dist_nn.all_gather(x), dim=0)


def _gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """all_gather without gradient (labels)."""
    if world_size <= 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def query_alignment(image_queries: torch.Tensor, class_q: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 0.07) -> torch.Tensor:
    """Symmetric query alignment between images and the queries of their classes (see module doc)."""
    qv = F.normalize(image_queries.float(), dim=-1)
    qc = F.normalize(class_q.float(), dim=-1)
    sim = qv @ qc.T / temperature  # (B, C)
    i2c = F.cross_entropy(sim, labels)
    present = torch.unique(labels)
    targets = (labels.unsqueeze(0) == present.unsqueeze(1)).float()  # (P, B)
    targets = targets / targets.sum(dim=1, keepdim=True)
    c2i = -(targets * F.log_softmax(sim.T[present], dim=1)).sum(dim=1).mean()
    return 0.5 * (i2c + c2i)


class ClassificationLoss(nn.Module):
    """Cross-entropy + lambda_q * query alignment (+ lambda_orth * mean cos^2 with orth="soft")."""

    def __init__(self, lambda_q: float = 0.1, lambda_orth: float = 1.0, q_temperature: float = 0.07,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.lambda_q, self.lambda_orth, self.q_temperature = lambda_q, lambda_orth, q_temperature
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_config(cls, config, rank: int = 0, world_size: int = 1) -> "ClassificationLoss":
        return cls(config.lambda_q, config.lambda_orth, config.q_temperature, rank, world_size)

    TERM = "cross_entropy"  # the task term's name in the step's record (metrics.jsonl)

    def task_term(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def alignment(self, image_queries: torch.Tensor, class_q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return query_alignment(image_queries, class_q, labels, self.q_temperature)

    def forward(self, out: ClassifierOutput, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        terms = {self.TERM: self.task_term(out.logits, labels)}
        total = terms[self.TERM]
        if self.lambda_q and out.image_queries is not None and out.class_queries is not None:
            qv = _gather_with_grad(out.image_queries, self.world_size)
            y = _gather(labels, self.world_size)
            terms["query_alignment"] = self.alignment(qv, out.class_queries, y)
            total = total + self.lambda_q * terms["query_alignment"]
        return finish_terms(terms, total, out.orth_penalty, self.lambda_orth)


@torch.no_grad()
def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES, *,
                         device=None, batch_size: int = 256) -> torch.Tensor:
    """(C, E) unit class embeddings from the (adapted) prompt tower, for evaluation."""
    tokens = model.class_prompt_tokens(classnames, templates)
    device = device if device is not None else next(model.parameters()).device
    feats = [model.prompt_tower(tokens[i:i + batch_size].to(device)).features.float()
             for i in range(0, tokens.shape[0], batch_size)]
    return class_embeddings(torch.cat(feats), len(classnames))


def prompt_logits(model, image_features: torch.Tensor, classnames: Sequence[str],
                  templates: Sequence[str] = TEMPLATES, *, device=None) -> torch.Tensor:
    """(n, C) logit_scale * cos(image, prompt-ensembled class), on the CPU: the classifier of every
    model without one of its own (FrozenCLIPWrapper.classification_logits)."""
    classes = zero_shot_classifier(model, classnames, templates, device=device).float().cpu()
    return model.class_logits(image_features.float().cpu(), classes)


@torch.no_grad()
def classification_logits(model, image_features: torch.Tensor, classnames: Sequence[str],
                          templates: Sequence[str] = TEMPLATES, *, device=None) -> torch.Tensor:
    """(n, C) logits, on the CPU, for image features from model.encode_image: the model's
    `classification_logits` (prompt_logits, or linear-probe's own head)."""
    return model.classification_logits(image_features, classnames, templates, device=device).float().cpu()
