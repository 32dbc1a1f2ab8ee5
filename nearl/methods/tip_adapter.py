"""Tip-Adapter (Zhang et al., ECCV 2022, arXiv 2111.03930) as a baseline: a training-free cache model.

The keys are the L2-normalised frozen image features of the few-shot training images (N of them),
the values their one-hot labels (N x C); an image feature f (normalised) is scored

    logits = logit_scale * f W_c^T + alpha * exp(-beta (1 - f K^T)) V

W_c: the prompt-ensemble zero-shot classifier (C x E). alpha = 1 and beta = 5.5 by default (the
paper's); with validation images they are searched on them as the paper's code does (beta in
0.1 .. 7 in 200 steps, alpha in 0.1 .. 3 in 20 steps, by accuracy), and kept otherwise
(`--no-tip-search`, or no validation split). The cache is built before the trainer runs
(MethodSpec.prepare: the features are computed once, without augmentation; the paper averages
10 augmented passes); Tip-Adapter has no learnable parameter, so the shared loop only validates and
checkpoints it (the cache travels in the checkpoint). Tip-Adapter-F (tip_adapter_f.py) learns K.

Classification only. Its cache holds the training classes only: asked to score other classes it
raises (it would be the zero-shot CLIP on them: --method zeroshot), so base-to-novel leaves it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec

# The paper's search grid (its code's search_scale [7, 3], search_step [200, 20]): beta, alpha.
BETAS = tuple(0.1 + i * (7 - 0.1) / 200 for i in range(200))
ALPHAS = tuple(0.1 + i * (3 - 0.1) / 20 for i in range(20))


@dataclass
class TipAdapterConfig(MethodConfig):
    alpha: float = 1.0  # weight of the cache logits
    beta: float = 5.5  # sharpness of the affinities
    search: bool = True  # search alpha and beta on the validation images when there are some
    classnames: List[str] = field(default_factory=list)  # the cached classes, in the values' order (from the data)
    cache_size: int = 0  # N: the cached training images (set when the cache is built)
    searched: bool = False  # whether alpha and beta were chosen on validation (recorded in checkpoints)

    def __post_init__(self):
        if not self.alpha >= 0 or not self.beta > 0:
            raise ValueError(f"alpha must be >= 0 and beta > 0, got {self.alpha}, {self.beta}")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {self.cache_size!r}")


class TipAdapter(MethodModel):
    method = "tip-adapter"
    tasks = ("classification",)
    refusals = {"multilabel": "its cache holds one label per image (one-hot values), not a multi-hot vector"}
    learn_keys = False  # Tip-Adapter-F: the keys are a learnable linear layer

    def __init__(self, backbone: nn.Module, config: Optional[TipAdapterConfig] = None, **kw):
        config = config or TipAdapterConfig()
        super().__init__(backbone, config, **kw)
        self.embed_dim = self.tower("vision").output_dim()
        n = config.cache_size  # 0 until the cache is built (prepare), N when rebuilt from a checkpoint
        self._set(torch.zeros(n, self.embed_dim), torch.zeros(n, len(config.classnames)))

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name in ("cache_keys", "cache_values"):
            if hasattr(self, name):
                delattr(self, name)
        if self.learn_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_values", values)
        self.config.cache_size = int(keys.shape[0])

    def set_cache(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Keys: the normalised features (N, E); values: the one-hot labels (N, C)."""
        num_classes = len(self.config.classnames)
        if num_classes < 1:
            raise ValueError("tip-adapter: no class names to build the cache's values from")
        keys = F.normalize(features.detach().float(), dim=-1)
        self._set(keys, F.one_hot(labels.long(), num_classes).float().to(keys.device))

    def cache_logits(self, f: torch.Tensor, beta: Optional[float] = None) -> torch.Tensor:
        """exp(-beta (1 - f K^T)) V for normalised features f (n, E)."""
        beta = self.config.beta if beta is None else beta
        affinity = f @ self.cache_keys.to(f.device, f.dtype).T
        return torch.exp(-beta * (1 - affinity)) @ self.cache_values.to(f.device, f.dtype)

    def class_logits(self, image_features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        logits = super().class_logits(image_features, classes)
        if self.config.cache_size == 0:  # no cache yet: the zero-shot CLIP
            return logits
        if classes.shape[0] != self.cache_values.shape[1]:
            raise ValueError(f"{self.method}: its cache holds {self.cache_values.shape[1]} classes, asked to score "
                             f"{classes.shape[0]}")
        f = F.normalize(image_features.float(), dim=-1)
        return logits + self.config.alpha * self.cache_logits(f).to(logits.device)

    def classification_logits(self, image_features: torch.Tensor, classnames: Sequence[str], templates=None,
                              device=None) -> torch.Tensor:
        if self.config.cache_size and list(classnames) != list(self.config.classnames):
            raise ValueError(f"{self.method}: its cache holds the classes it was built on, in their order "
                             f"({list(self.config.classnames)[:5]}...), asked to score {list(classnames)[:5]}...: "
                             "it cannot score new classes (on them it is the zero-shot CLIP: --method zeroshot)")
        return super().classification_logits(image_features, classnames, templates, device=device)

    # the cache travels in the checkpoint, learnable (Tip-Adapter-F's keys) or not
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        state = super().trainable_state_dict()
        state.update(cache_keys=self.cache_keys, cache_values=self.cache_values)
        return state

    def _breakdown(self) -> Dict[str, int]:
        n, c = self.cache_values.shape
        learnt = "learnable" if self.learn_keys else "fixed"
        return {f"Cache keys ({n} x {self.embed_dim}, {learnt})": self.cache_keys.numel(),
                f"Cache values ({n} x {c}, one-hot, fixed)": self.cache_values.numel()}


@torch.no_grad()
def search_alpha_beta(model: TipAdapter, val_x: torch.Tensor, val_y: torch.Tensor, classes: torch.Tensor):
    """(alpha, beta, accuracy): the paper's grid searched by validation accuracy (the first best kept)."""
    f = F.normalize(val_x.float(), dim=-1)
    zero_shot = MethodModel.class_logits(model, f, classes.to(f.device))
    best = (-1.0, model.config.alpha, model.config.beta)
    for beta in BETAS:
        cache = model.cache_logits(f, beta)
        for alpha in ALPHAS:
            acc = float(((zero_shot + alpha * cache).argmax(1) == val_y).float().mean())
            if acc > best[0]:
                best = (acc, alpha, beta)
    return best[1], best[2], 100.0 * best[0]


def build_cache(model: TipAdapter, train_x, train_y, val_x, val_y, templates) -> str:
    """MethodSpec.prepare: the cache from the training features; alpha and beta searched on validation."""
    from nearl.model.classify import zero_shot_classifier
    cfg = model.config
    model.set_cache(train_x, train_y)
    head = f"{model.method}: cache of {cfg.cache_size} training images, {len(cfg.classnames)} classes; "
    if not cfg.search:
        return head + f"alpha {cfg.alpha:g}, beta {cfg.beta:g} as given (--no-tip-search)"
    if val_x is None or len(val_y) == 0:
        return head + f"alpha {cfg.alpha:g}, beta {cfg.beta:g} (no validation images: the defaults, not searched)"
    classes = zero_shot_classifier(model, cfg.classnames, templates, device=train_x.device)
    cfg.alpha, cfg.beta, acc = search_alpha_beta(model, val_x, val_y.long().to(val_x.device), classes)
    cfg.searched = True
    return head + f"alpha {cfg.alpha:.4g}, beta {cfg.beta:.4g} chosen on validation (accuracy {acc:.2f})"


def classnames_from_data(data) -> Dict[str, List[str]]:
    return {"classnames": list(data.classnames)} if data is not None and data.classnames else {}


SPEC = MethodSpec(  # its aliases and options (--tip-alpha, --tip-beta, --no-tip-search): nearl/methods/options.py
    model_cls=TipAdapter, config_cls=TipAdapterConfig,
    summary="training-free cache model of the few-shot features (+ zero-shot)",
    title="Tip-Adapter", prepare=build_cache, config_from_data=classnames_from_data,
    scores_unseen_classes=False,  # its cache scores the cached classes only
    untrained_is_zero_shot=True,  # without a cache it is the zero-shot CLIP
    training_note="building the cache, no training",
)
