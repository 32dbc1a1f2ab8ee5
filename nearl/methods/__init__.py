"""Adaptation methods compared on the same backbone, data, seeds and budget.

    model = build_method("alta", "ViT-B-16", "openai", seed=0, multiview=True)

Every method returns an nn.Module with NEARLCLIP's interface (see nearl/methods/base.py), so
training, evaluation and the checkpoints treat them alike. Each method's module declares a
`MethodSpec` named SPEC (registry.py): its model and config classes, tasks, command-line options.
A new method is a new module here, named in METHOD_MODULES.

    nearl         NEARL-CLIP itself (nearl.build)                       retrieval, classification
    alta          ALTA adapters in every block of both towers          retrieval, classification
    clip-adapter  residual bottleneck MLPs on the final features       retrieval, classification
    coop          learned prompt context (M = 16)                      classification
    linear-probe  logistic regression on frozen image features         classification
    zeroshot      the frozen CLIP with prompt templates, no training   retrieval, classification

A random backbone (pretrained=None) is drawn under torch.manual_seed(seed) before anything else,
so every method built with one seed wraps the very same backbone weights.
"""
from __future__ import annotations

import importlib
from typing import Tuple

from .base import MethodConfig, MethodModel
from .registry import (MethodSpec, Option, add_method_options, build_from_checkpoint, build_method, canonical,
                       check_options, check_task, config_fields, fixed_on_resume, method_config, method_of,
                       methods_for, names, register, spec)

# The order of listings and of nearl.compare's table.
METHOD_MODULES = ("nearl", "alta", "clip_adapter", "coop", "linear_probe", "zeroshot")
for _name in METHOD_MODULES:
    register(importlib.import_module(f".{_name}", __name__).SPEC)

METHODS: Tuple[str, ...] = names()

__all__ = ["METHODS", "METHOD_MODULES", "MethodConfig", "MethodModel", "MethodSpec", "Option", "add_method_options",
           "build_from_checkpoint", "build_method", "canonical", "check_options", "check_task", "config_fields",
           "fixed_on_resume", "method_config", "method_of", "methods_for", "spec"]
