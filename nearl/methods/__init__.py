"""Adaptation methods compared on the same backbone, data, seeds and budget.

    model = build_method("alta", "ViT-B-16", "openai", seed=0, multiview=True)

Every method returns an nn.Module with NEARLCLIP's interface (see nearl/methods/base.py), so
training, evaluation and the checkpoints treat them alike; the hooks a method may override
(class_prompt_tokens, prompt_tower, classification_logits, decays, num_views) are declared with
their defaults on nearl.frozen.FrozenCLIPWrapper, which NEARLCLIP and MethodModel derive from. Each
method's module declares a `MethodSpec` named SPEC (registry.py): its model and config classes,
tasks, and what callers treat differently (its title, whether it scores unseen classes, ...). Its aliases and
command-line options are declared, without torch, in nearl/method_options.py (so --help lists them
without importing the methods). A new method is a new module here, named in METHOD_MODULES, and
its entry in nearl/method_options.py.

    nearl         NEARL-CLIP itself (nearl.build)                       retrieval, classification
    alta          ALTA adapters in every block of both towers          retrieval, classification
    clip-adapter  residual bottleneck MLPs on the final features       retrieval, classification
    coop          learned prompt context (M = 16)                      classification
    linear-probe  logistic regression on frozen image features         classification
    zeroshot      the frozen CLIP with prompt templates, no training   retrieval, classification
    tip-adapter   training-free cache model of the few-shot features   classification
    tip-adapter-f Tip-Adapter with its cache keys fine-tuned            classification
    clip-lora     LoRA on q, k, v of every attention layer, both towers retrieval, classification

A random backbone (pretrained=None) is drawn under torch.manual_seed(seed) before anything else,
so every method built with one seed wraps the very same backbone weights.
"""
from __future__ import annotations

import importlib
from typing import Tuple

from .base import MethodConfig, MethodModel
from .registry import (DEFAULT_METHOD, MethodSpec, Option, add_method_options, build_from_checkpoint, build_method,
                       canonical, check_options, check_task, config_fields, fixed_on_resume, method_config,
                       method_of, methods_for, names, register, spec)

# The order of listings and of nearl.compare's table.
METHOD_MODULES = ("nearl", "alta", "clip_adapter", "coop", "linear_probe", "zeroshot", "tip_adapter", "tip_adapter_f",
                  "clip_lora")
for _name in METHOD_MODULES:
    register(importlib.import_module(f".{_name}", __name__).SPEC)

METHODS: Tuple[str, ...] = names()

__all__ = ["DEFAULT_METHOD", "METHODS", "METHOD_MODULES", "MethodConfig", "MethodModel", "MethodSpec", "Option",
           "add_method_options", "build_from_checkpoint", "build_method", "canonical", "check_options", "check_task", "config_fields",
           "fixed_on_resume", "method_config", "method_of", "methods_for", "spec"]
