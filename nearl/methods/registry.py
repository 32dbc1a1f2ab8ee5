"""One registry for the adaptation methods.

Each method's module declares a `MethodSpec` named SPEC: its model class (which carries the method's
name and tasks), its config class, its command-line options and how its config comes from the
command line and the data. `nearl/methods/__init__.py` registers them; training, evaluation,
comparison and checkpoint loading find methods here, and build and restore every method, NEARL-CLIP
included, the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..errors import UserError
from ..model import SCHEMAS, create_backbone


@dataclass(frozen=True)
class Option:
    """A command-line option of a method. `config`: the config field it sets (None for an option of
    the data pipeline); `convert`: the parsed value -> the config value; `fixed`: it shapes the
    model, so a resumed run keeps the checkpoint's value."""
    flags: Tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    config: Optional[str] = None
    convert: Optional[Callable[[Any], Any]] = None
    fixed: bool = False

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class MethodSpec:
    model_cls: type  # built as model_cls(backbone, config_cls(**config), model_name=..., fused=...)
    config_cls: type
    summary: str  # one line for listings
    options: Tuple[Option, ...] = ()
    aliases: Tuple[str, ...] = ()
    fused_kernels: bool = False  # --fused means something for it
    # the config fields the training data decides (linear-probe: the number of classes)
    config_from_data: Optional[Callable[[Any], Dict[str, Any]]] = None
    # "gradient": the shared training loop; "features": fitted on cached features, in one process
    trainer: str = "gradient"
    # more checks of the parsed options than their types make (UserError); `check_options` runs it
    check: Optional[Callable[[argparse.Namespace], None]] = None

    @property
    def name(self) -> str:
        return self.model_cls.method

    @property
    def tasks(self) -> Tuple[str, ...]:
        return tuple(self.model_cls.tasks)

    def config_fields(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.config_cls))


_SPECS: Dict[str, MethodSpec] = {}
_ALIASES: Dict[str, str] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _SPECS:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def names() -> Tuple[str, ...]:
    return tuple(_SPECS)


def canonical(name: str) -> str:
    """'CLIP_Adapter' -> 'clip-adapter'; an unknown name raises a ValueError listing the known ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_SPECS)}")
    return key


def spec(name: str) -> MethodSpec:
    return _SPECS[canonical(name)]


def check_task(method: str, task: str) -> None:
    """A clear error when a method does not apply to a task (coop / linear-probe on retrieval)."""
    s = spec(method)
    if task not in s.tasks:
        raise ValueError(f"method {s.name!r} does not apply to task {task!r}: it supports "
                         f"{' and '.join(s.tasks)} only")


def methods_for(task: str) -> Tuple[str, ...]:
    return tuple(name for name, s in _SPECS.items() if task in s.tasks)


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
        shown = pretrained if pretrained is not None and pretrained.startswith(SCHEMAS) else model_name
        return s.model_cls(backbone, s.config_cls(**cfg), model_name=shown, fused=fused)


def build_from_checkpoint(ckpt, *, fused: bool = False, pretrained: Optional[str] = "checkpoint",
                          model_name: Optional[str] = None) -> nn.Module:
    """The model a checkpoint (a path or a loaded dict) describes, learnable parameters loaded.
    pretrained: "checkpoint" rebuilds the recorded backbone (a random one from the recorded seed);
    another source (tag, file, hf-hub:, local-dir:) or None (random) overrides it."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    source = ckpt.get("pretrained") if pretrained == "checkpoint" else pretrained
    model = build_method(ckpt.get("method") or "nearl", model_name or ckpt["model_name"], source, fused=fused,
                         seed=int(ckpt.get("backbone_seed", 0)), **ckpt.get("config", {}))
    model.load_trainable_state_dict(ckpt["model"])
    return model


# ----------------------------------------------------------------------------- command lines
def _options() -> Dict[str, Tuple[Option, List[str]]]:
    """Every method option by dest, with the methods taking it (a flag two methods share, such as
    --reduction, is declared by both and added once)."""
    found: Dict[str, Tuple[Option, List[str]]] = {}
    for s in _SPECS.values():
        for opt in s.options:
            if opt.dest in found:
                first, users = found[opt.dest]
                if (first.flags, first.kwargs.get("default")) != (opt.flags, opt.kwargs.get("default")):
                    raise ValueError(f"methods {users + [s.name]} declare option {opt.dest!r} differently")
                users.append(s.name)
            else:
                found[opt.dest] = (opt, [s.name])
    return found


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, holding the options it declares first."""
    groups: Dict[str, Any] = {}
    for dest, (opt, users) in _options().items():
        owner = users[0]
        if owner not in groups:
            title = ("NEARL-CLIP options" if owner == "nearl"
                     else f"{owner} options (another method ignores their values and refuses their switches)")
            groups[owner] = parser.add_argument_group(title)
        kwargs = dict(opt.kwargs)
        if len(users) > 1:
            kwargs["help"] = f"{', '.join(users)}: {kwargs.get('help', '')}"
        groups[owner].add_argument(*opt.flags, **kwargs)


def fixed_on_resume() -> Tuple[str, ...]:
    """The dests of the options that shape a model."""
    return tuple(dest for dest, (opt, _) in _options().items() if opt.fixed)


def check_options(name: str, args: argparse.Namespace) -> None:
    """A switch of another method turned on (a store_true option it declares, such as alta's
    --multiview) is a UserError naming its method, not silently ignored; then the method's own check."""
    s = spec(name)
    own = {opt.dest for opt in s.options}
    for dest, (opt, users) in _options().items():
        if dest not in own and opt.kwargs.get("action") == "store_true" and getattr(args, dest, False):
            raise UserError(f"{opt.flags[0]} is an option of method {' / '.join(repr(u) for u in users)} "
                            f"(got method {s.name!r})")
    if s.check is not None:
        s.check(args)


def method_config(name: str, args: argparse.Namespace, data: Any = None) -> Dict[str, Any]:
    """The config fields of method `name` from the command line and, where the method says so, the data."""
    s = spec(name)
    config = {}
    for opt in s.options:
        if opt.config is None:
            continue
        value = getattr(args, opt.dest, opt.kwargs.get("default"))
        config[opt.config] = opt.convert(value) if opt.convert is not None else value
    if s.config_from_data is not None:
        config.update(s.config_from_data(data))
    return config
