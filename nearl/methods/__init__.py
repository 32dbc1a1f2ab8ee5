"""Adaptation methods compared on the same backbone, data, seeds and budget.

    model = build_method("alta", "ViT-B-16", "openai", seed=0, multiview=True)

Every method returns an nn.Module with NEARLCLIP's interface (see nearl/methods/base.py), so
nearl/train.py, nearl/evaluate.py and the checkpoints treat them alike:

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

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .base import MethodConfig, MethodModel

METHODS: Tuple[str, ...] = ("nearl", "alta", "clip-adapter", "coop", "linear-probe", "zeroshot")
TASKS: Dict[str, Tuple[str, ...]] = {
    "nearl": ("retrieval", "classification"),
    "alta": ("retrieval", "classification"),
    "clip-adapter": ("retrieval", "classification"),
    "coop": ("classification",),
    "linear-probe": ("classification",),
    "zeroshot": ("retrieval", "classification"),
}
ALIASES = {"nearl-clip": "nearl", "clip_adapter": "clip-adapter", "clipadapter": "clip-adapter",
           "linear_probe": "linear-probe", "linear": "linear-probe", "zero-shot": "zeroshot",
           "zero_shot": "zeroshot"}

__all__ = ["METHODS", "TASKS", "build_method", "build_from_checkpoint", "canonical", "check_task",
           "method_of", "methods_for", "MethodModel", "MethodConfig"]


def canonical(name: str) -> str:
    """'CLIP_Adapter' -> 'clip-adapter'; an unknown name raises a ValueError listing the known ones."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return key


def check_task(method: str, task: str) -> None:
    """A clear error when a method does not apply to a task (coop / linear-probe on retrieval)."""
    method = canonical(method)
    if task not in TASKS[method]:
        raise ValueError(f"method {method!r} does not apply to task {task!r}: it supports "
                         f"{' and '.join(TASKS[method])} only")


def methods_for(task: str) -> Tuple[str, ...]:
    return tuple(m for m in METHODS if task in TASKS[m])


def method_of(model: nn.Module) -> str:
    """The method a model implements ('nearl' for a NEARLCLIP)."""
    return getattr(model, "method", "nearl")


def _classes():
    from .alta import ALTA, ALTAConfig
    from .clip_adapter import CLIPAdapter, CLIPAdapterConfig
    from .coop import CoOp, CoOpConfig
    from .linear_probe import LinearProbe, LinearProbeConfig
    from .zeroshot import ZeroShot, ZeroShotConfig
    return {"alta": (ALTA, ALTAConfig), "clip-adapter": (CLIPAdapter, CLIPAdapterConfig),
            "coop": (CoOp, CoOpConfig), "linear-probe": (LinearProbe, LinearProbeConfig),
            "zeroshot": (ZeroShot, ZeroShotConfig)}


def config_fields(name: str) -> Tuple[str, ...]:
    """The config keys a method takes (NEARLConfig's fields for nearl)."""
    import dataclasses
    name = canonical(name)
    if name == "nearl":
        from ..config import NEARLConfig
        return tuple(f.name for f in dataclasses.fields(NEARLConfig))
    return tuple(f.name for f in dataclasses.fields(_classes()[name][1]))


def build_method(name: str, model_name: str, pretrained: Optional[str] = None, *, fused: bool = False,
                 seed: int = 0, **cfg: Any) -> nn.Module:
    """The model of method `name` around a frozen open_clip backbone (`model_name`, `pretrained` as in
    nearl.build). cfg: the method's config fields (NEARLConfig's for nearl; see each module's
    *Config); unknown fields raise. Initial weights (a random backbone included) are drawn from
    torch.manual_seed(seed) without touching the global generator."""
    name = canonical(name)
    if name == "nearl":
        from ..checkpoint import build_model
        model = build_model(model_name, pretrained, fused=fused, seed=seed, **cfg)
        model.method = "nearl"
        return model
    from ..model import SCHEMAS, create_backbone
    cls, config_cls = _classes()[name]
    unknown = sorted(set(cfg) - set(config_fields(name)))
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; it takes {list(config_fields(name))}")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        backbone = create_backbone(model_name, pretrained)
        shown = pretrained if pretrained is not None and pretrained.startswith(SCHEMAS) else model_name
        return cls(backbone, config_cls(**cfg), model_name=shown, fused=fused)


def build_from_checkpoint(ckpt, *, fused: bool = False, pretrained: Optional[str] = "checkpoint",
                          model_name: Optional[str] = None) -> nn.Module:
    """The model a checkpoint describes (its "method", "nearl" when absent), learnable parameters loaded.
    pretrained: "checkpoint" rebuilds the recorded backbone; another source or None overrides it."""
    from .. import checkpoint as C
    if not isinstance(ckpt, dict):
        ckpt = C.load_checkpoint(ckpt)
    method = canonical(ckpt.get("method") or "nearl")
    if method == "nearl":
        model = C.build_from_checkpoint(ckpt, fused=fused, pretrained=pretrained, model_name=model_name)
        model.method = "nearl"
        return model
    source = ckpt.get("pretrained") if pretrained == "checkpoint" else pretrained
    model = build_method(method, model_name or ckpt["model_name"], source, fused=fused,
                         seed=int(ckpt.get("backbone_seed", 0)), **ckpt.get("config", {}))
    model.load_trainable_state_dict(ckpt["model"])
    return model

