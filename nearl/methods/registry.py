"""One registry for the adaptation methods.

Each method's module declares a `MethodSpec` named SPEC: its model class (which carries the method's
name and tasks), its config class and how its config comes from the command line and the data. Its
aliases and command-line options are declared in nearl/methods/options.py, which the command lines
read without importing the methods (and torch). Every method DECLARED there is imported from its
module (the name with "_" for "-") and registered here on first use; training, evaluation,
comparison and checkpoint loading find methods here, and build and restore every method, NEARL-CLIP
included, the same way. What callers treat differently from one method to another is a MethodSpec
attribute: nothing outside nearl/methods/ tests a method's name (tests/methods/test_method_interface.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from nearl.store.checkpoint import load_checkpoint
from nearl.errors import UserError
from nearl.methods.options import (DECLARED, DEFAULT_METHOD, Option, add_method_options, canonical, fixed_on_resume,
                              options)
from nearl.model.frozen import BackboneSource
from nearl.model.nearl_clip import create_backbone
from nearl.towers.sources import backbone_name

__all__ = ["DEFAULT_METHOD", "MethodSpec", "Option", "add_method_options", "build_from_checkpoint", "build_method", "canonical",
           "check_options", "check_task", "config_fields", "fixed_on_resume", "method_config", "method_of",
           "methods_for", "module_of", "names", "register", "spec"]


@dataclass(frozen=True)
class MethodSpec:
    model_cls: type  # built as model_cls(backbone, config_cls(**config), model_name=..., fused=...)
    config_cls: type
    summary: str  # one line for listings
    fused_kernels: bool = False  # --fused means something for it
    # the config fields the training data decides (linear-probe: the number of classes)
    config_from_data: Optional[Callable[[Any], Dict[str, Any]]] = None
    # "gradient": the shared training loop; "features": fitted on cached features, in one process
    trainer: str = "gradient"
    # fitted to the frozen features of the training (and validation) images before its trainer runs
    # (Tip-Adapter's cache): prepare(model, train_x, train_y, val_x, val_y, templates) -> a line to print
    prepare: Optional[Callable[..., str]] = None
    # the classification training objective, where it is not PromptClassifier + ClassificationLoss
    # (BiomedCoOp: its teacher prompts' terms): objective(model, classnames, templates, device, config
    # (the run's TrainConfig), rank, world_size) -> (module, loss, the loss of one unsharded probe step)
    objective: Optional[Callable[..., Tuple[nn.Module, nn.Module, nn.Module]]] = None
    # more checks of the parsed options than their types make (UserError); `check_options` runs it
    check: Optional[Callable[[Any], None]] = None  # takes the run's TrainConfig
    # What callers once decided by the method's name:
    title: Optional[str] = None  # its name in results tables and labels (None: the method's name)
    scores_unseen_classes: bool = True  # classify classes it was not trained on (linear-probe's head cannot)
    # a fresh model of it is the frozen CLIP, so evaluating one without a checkpoint is a zero-shot evaluation
    untrained_is_zero_shot: bool = False
    named_in_messages: bool = True  # messages say "method <name>" (NEARL-CLIP, the default, goes unnamed)
    training_note: str = "training {steps} steps"  # nearl.compare's line before each run ({steps}: --max-steps)

    @property
    def display_name(self) -> str:
        return self.title or self.name

    @property
    def name(self) -> str:
        return self.model_cls.method

    @property
    def tasks(self) -> Tuple[str, ...]:
        return tuple(self.model_cls.tasks)

    @property
    def options(self) -> Tuple[Option, ...]:  # its command-line options (nearl/methods/options.py)
        return DECLARED[self.name].options

    @property
    def aliases(self) -> Tuple[str, ...]:
        return DECLARED[self.name].aliases

    def config_fields(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.config_cls))


_SPECS: Dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _SPECS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    if spec.name not in DECLARED:
        raise ValueError(f"method {spec.name!r} has no entry in nearl/methods/options.py (its aliases and options)")
    _SPECS[spec.name] = spec
    return spec


def module_of(name: str) -> str:
    """The module that defines method `name` (its SPEC): nearl/methods/<name, "_" for "-">.py."""
    return "nearl.methods." + name.replace("-", "_")


def _specs() -> Dict[str, MethodSpec]:
    """Every method, registered on first use in DECLARED's order (listings, nearl.compare's table), so
    importing one method's module never imports the others."""
    if not _SPECS:
        for name in DECLARED:
            register(importlib.import_module(module_of(name)).SPEC)
    return _SPECS


def names() -> Tuple[str, ...]:
    return tuple(_specs())


def spec(name: str) -> MethodSpec:
    return _specs()[canonical(name)]


def check_task(method: str, task: str) -> None:
    """A clear error when a method does not apply to a task (coop / linear-probe on retrieval)."""
    s = spec(method)
    if task not in s.tasks:
        reasons = getattr(s.model_cls, "refusals", {})  # MethodModel.refusals: why, where a method says
        why = f" ({reasons[task]})" if task in reasons else ""
        raise ValueError(f"method {s.name!r} does not apply to task {task!r}{why}: it supports "
                         f"{' and '.join(s.tasks)} only")


def methods_for(task: str) -> Tuple[str, ...]:
    return tuple(name for name, s in _specs().items() if task in s.tasks)


def method_of(model: nn.Module) -> str:
    """The method a model implements."""
    return type(model).method


def config_fields(name: str) -> Tuple[str, ...]:
    """The config keys a method takes."""
    return spec(name).config_fields()


def build_method(name: str, model_name: str, pretrained: Optional[str] = None, *, fused: bool = False,
                 seed: int = 0, **cfg: Any) -> nn.Module:
    """The model of method `name` around a frozen open_clip backbone (`model_name`, `pretrained` as in
    nearl.build). cfg: the method's config fields; unknown fields raise. Initial weights (a random
    backbone included) are drawn from torch.manual_seed(seed) without touching the global generator,
    so a checkpoint, which never stores backbone weights, can rebuild a random backbone exactly."""
    s = spec(name)
    unknown = sorted(set(cfg) - set(s.config_fields()))
    if unknown:
        raise ValueError(f"method {s.name!r} has no option(s) {unknown}; it takes {list(s.config_fields())}")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        backbone = create_backbone(model_name, pretrained)
        model = s.model_cls(backbone, s.config_cls(**cfg), model_name=backbone_name(model_name, pretrained),
                            fused=fused)
    model.backbone_source = BackboneSource(model_name, pretrained, int(seed))  # what save_pretrained records
    return model


def build_from_checkpoint(ckpt, *, fused: bool = False, pretrained: Optional[str] = "checkpoint",
                          model_name: Optional[str] = None) -> nn.Module:
    """The model a checkpoint (a path or a loaded dict) describes, learnable parameters loaded.
    pretrained: "checkpoint" rebuilds the recorded backbone (a random one from the recorded seed);
    another source (tag, file, hf-hub:, local-dir:) or None (random) overrides it."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    source = ckpt.get("pretrained") if pretrained == "checkpoint" else pretrained
    model = build_method(ckpt.get("method") or DEFAULT_METHOD, model_name or ckpt["model_name"], source, fused=fused,
                         seed=int(ckpt.get("backbone_seed", 0)), **ckpt.get("config", {}))
    model.load_trainable_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------- command lines
def check_options(name: str, config: Any) -> None:
    """A switch of another method turned on (a store_true option it declares, such as alta's
    --multiview) is a UserError naming its method, not silently ignored; then the method's own check."""
    s = spec(name)
    own = {opt.dest for opt in s.options}
    for dest, (opt, users) in options().items():
        if dest not in own and opt.kwargs.get("action") == "store_true" and config.option(dest):
            raise UserError(f"{opt.flags[0]} is an option of method {' / '.join(repr(u) for u in users)} "
                            f"(got method {s.name!r})")
    if s.check is not None:
        s.check(config)


def method_config(name: str, config: Any, data: Any = None) -> Dict[str, Any]:
    """The config fields of method `name` from a run's TrainConfig (its `option(dest)`: the value given,
    else the declared default) and, where the method says so, the data."""
    s = spec(name)
    fields = {}
    for opt in s.options:
        if opt.config is None:
            continue
        value = config.option(opt.dest)
        fields[opt.config] = opt.convert(value) if opt.convert is not None else value
    if s.config_from_data is not None:
        fields.update(s.config_from_data(data))
    return fields
