"""Tip-Adapter-F (Zhang et al., ECCV 2022, arXiv 2111.03930): Tip-Adapter whose cache keys are
fine-tuned. The keys K (N x E) become a learnable linear layer f -> f K^T initialised from the
cache (the values stay the fixed one-hot labels), trained with the shared loop on the
cross-entropy of the Tip-Adapter logits (nearl/methods/tip_adapter.py):

    logits = logit_scale * f W_c^T + alpha * exp(-beta (1 - f K^T)) V

The cache is built, and alpha and beta searched on validation, before training (the paper trains
with its initial alpha, beta and searches them after); the fine-tuned keys are not re-normalised,
as in the paper's code. Classification only; it scores its training classes only.
"""
from __future__ import annotations

from nearl.methods.registry import MethodSpec
from nearl.methods.tip_adapter import TipAdapter, TipAdapterConfig, build_cache, classnames_from_data


class TipAdapterF(TipAdapter):
    method = "tip-adapter-f"
    learn_keys = True


SPEC = MethodSpec(  # its aliases and options (shared with tip-adapter): nearl/methods/options.py
    model_cls=TipAdapterF, config_cls=TipAdapterConfig,
    summary="Tip-Adapter with its cache keys fine-tuned",
    title="Tip-Adapter-F", prepare=build_cache, config_from_data=classnames_from_data,
    scores_unseen_classes=False,  # its cache scores the cached classes only
    training_note="building the cache, then training {steps} steps",
)
