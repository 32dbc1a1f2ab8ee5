"""The adaptation methods' command-line face, without torch: their names (in listing order), aliases
and options.

The methods themselves (nearl/methods/) import torch and the backbones; `python -m nearl.train
--help` and `nearl.compare --help` list the methods and add their options from here instead, so
they answer before any of that is imported. Each method's `MethodSpec` (nearl/methods/registry.py)
takes its aliases and options from DECLARED; a method missing here cannot be registered, and
tests/test_cli_light.py checks that METHODS are the registry's names.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from nearl import argtypes as A
from nearl.errors import UserError


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
class Declared:
    """What the command line knows of a method: the other names it answers to, and its options."""
    aliases: Tuple[str, ...] = ()
    options: Tuple[Option, ...] = ()
    heading: Optional[str] = None  # its --help group's title (None: "<name> options (another method ...)")


# alta's multi-view studies: the manifest columns of the frontal/current, lateral/current, frontal/prior
# and lateral/prior views (nearl/methods/multiview.py)
VIEW_COLUMNS = ("image", "lateral", "prior", "prior_lateral")
# linear-probe's grid of L2 weights searched on validation (nearl/methods/linear_probe.py)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def weight_decays(text) -> List[float]:
    """--probe-wd: comma-separated L2 weights >= 0."""
    text = str(text or "0.001")
    try:
        wds = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UserError(f"--probe-wd takes comma-separated numbers, got {text!r}") from None
    if not wds or any(not math.isfinite(w) or w < 0 for w in wds):
        raise UserError(f"--probe-wd takes weights >= 0, got {text!r}")
    return wds


# alta's and clip-adapter's bottleneck: both declare this one option, and the command line adds it once.
REDUCTION = Option(("--reduction",), dict(type=A.positive_int, default=4, help="bottleneck d -> d/reduction"),
                   "reduction", fixed=True)

NEARL_OPTIONS = (
    Option(("--num-queries",), dict(type=A.queries, default=16, help="M (at most 1024)"), "num_queries", fixed=True),
    Option(("--query-dim",), dict(type=A.positive_int, default=128, help="D"), "query_dim", fixed=True),
    Option(("--heads",), dict(type=A.positive_int, default=4, help="H (query heads)"), "heads", fixed=True),
    Option(("--rank",), dict(type=A.positive_int, default=32, help="r (OCA rank)"), "rank", fixed=True),
    Option(("--orth",), dict(choices=("hard", "soft", "none"), default="hard"), "orth"),
    Option(("--lambda-q",), dict(type=A.non_negative_float, default=0.1,
                                 help="query-alignment weight (0 ablates it)"), "lambda_q"),
    Option(("--lambda-orth",), dict(type=A.non_negative_float, default=1.0,
                                    help="weight of mean cos^2 with --orth soft"), "lambda_orth"),
    Option(("--vision-layers",), dict(type=A.block_numbers, default=None,
                                      help="adapted vision blocks, 1-based: 'all' (default), 'none', '1,2,3', "
                                           "'7-12'"), "vision_layers", fixed=True),
    Option(("--text-layers",), dict(type=A.block_numbers, default=None, help="adapted text blocks (as above)"),
           "text_layers", fixed=True),
)

ALTA_OPTIONS = (
    REDUCTION,
    Option(("--multiview",), dict(action="store_true",
                                  help="studies with up to 4 views (manifest columns of --view-columns) and "
                                       "learned view / time embeddings; evaluation uses the frontal image"),
           "multiview", convert=bool, fixed=True),
    Option(("--view-columns",), dict(default=",".join(VIEW_COLUMNS),
                                     help="with --multiview: manifest columns of the frontal/current, "
                                          "lateral/current, frontal/prior and lateral/prior views "
                                          "(default %(default)s)")),
)

# tip-adapter's and tip-adapter-f's: both declare them, and the command line adds each once.
TIP_OPTIONS = (
    Option(("--tip-alpha",), dict(type=A.non_negative_float, default=1.0,
                                  help="weight of the cache logits (the paper's alpha; searched on validation "
                                       "unless --no-tip-search)"), "alpha"),
    Option(("--tip-beta",), dict(type=A.positive_float, default=5.5,
                                 help="sharpness of the cache affinities (the paper's beta; searched likewise)"), "beta"),
    Option(("--no-tip-search",), dict(action="store_true",
                                      help="keep --tip-alpha / --tip-beta instead of searching them on validation"),
           "search", convert=lambda off: not off),
)

LORA_OPTIONS = (
    Option(("--lora-rank",), dict(type=A.positive_int, default=2, help="LoRA rank r of each q, k, v update"),
           "rank", fixed=True),
    Option(("--lora-alpha",), dict(type=A.positive_float, default=1.0, help="LoRA scaling: the update is "
                                                                              "(alpha / r) B A"), "alpha"),
    Option(("--lora-dropout",), dict(type=A.unit_interval, default=0.25,
                                     help="dropout on the LoRA branch's input while training"), "dropout"),
)

# coop's and biomedcoop's: both declare it, each with its own default when it is not given (CoOp's
# paper 16; BiomedCoOp's code 4, the words of "a photo of a").
N_CTX_DEFAULTS = {"coop": 16, "biomedcoop": 4}


def n_ctx_option(method: str) -> Option:
    default = N_CTX_DEFAULTS[method]
    return Option(("--n-ctx",), dict(type=A.positive_int, default=None,
                                     help="learned context vectors M (default: coop 16, biomedcoop 4)"),
                  "n_ctx", convert=lambda n: default if n is None else n, fixed=True)


# BiomedCoOp's defaults are those of its code (nearl/methods/biomedcoop.py says where each comes from).
BIOMEDCOOP_OPTIONS = (
    n_ctx_option("biomedcoop"),
    Option(("--ctx-init",), dict(default="a photo of a",
                                 help="words the context vectors start from, one token each, as many as "
                                      "--n-ctx (else random, std 0.02; '' for random)"), "ctx_init"),
    Option(("--class-descriptions",), dict(default=None, metavar="FILE",
                                           help="JSON {class: [description, ...]}: the LLM-written prompts of "
                                                "each class (default: --templates filled with the class)")),
    Option(("--n-prompts",), dict(type=A.positive_int, default=50,
                                  help="the first N descriptions of each class are used"), "n_prompts"),
    Option(("--sccm-lambda",), dict(type=A.non_negative_float, default=1.0,
                                    help="weight of the semantic consistency term (MSE to the mean "
                                         "description feature)"), "sccm_lambda"),
    Option(("--kdsp-lambda",), dict(type=A.non_negative_float, default=1.0,
                                    help="weight of the distillation term (KL from the zero-shot logits of "
                                         "the kept descriptions)"), "kdsp_lambda"),
    Option(("--prune-tau",), dict(type=A.positive_float, default=1.5,
                                  help="descriptions whose standardised score is more than tau from the mean "
                                       "are left out of the distillation"), "tau"),
)

# Every method by name, in the order of listings and of nearl.compare's table; each is the module
# nearl/methods/<name, "_" for "-">.py, which the registry imports on first use.
DECLARED: Dict[str, Declared] = {
    "nearl": Declared(("nearl-clip",), NEARL_OPTIONS, heading="NEARL-CLIP options"),
    "alta": Declared((), ALTA_OPTIONS),
    "clip-adapter": Declared(("clip_adapter", "clipadapter"), (
        REDUCTION, Option(("--alpha",), dict(type=A.unit_interval, default=0.2, help="residual ratio"), "alpha"))),
    "coop": Declared((), (n_ctx_option("coop"),)),
    "biomedcoop": Declared(("biomed-coop", "biomed_coop"), BIOMEDCOOP_OPTIONS),
    "linear-probe": Declared(("linear_probe", "linear"), (
        Option(("--probe-wd",), dict(default=",".join(str(w) for w in DEFAULT_WEIGHT_DECAYS),
                                     help="L2 weights searched on validation (default %(default)s)"),
               "weight_decays", convert=weight_decays),)),
    "zeroshot": Declared(("zero-shot", "zero_shot")),
    "tip-adapter": Declared(("tip_adapter", "tipadapter", "tip"), TIP_OPTIONS),
    "tip-adapter-f": Declared(("tip_adapter_f", "tipadapter-f", "tip-f"), TIP_OPTIONS),
    "clip-lora": Declared(("lora", "clip_lora", "cliplora"), LORA_OPTIONS),
}
METHODS: Tuple[str, ...] = tuple(DECLARED)
# --method's default, and the method of a checkpoint written before checkpoints named theirs
DEFAULT_METHOD = "nearl"
_ALIASES = {alias: name for name, d in DECLARED.items() for alias in d.aliases}


def canonical(name: str) -> str:
    """'CLIP_Adapter' -> 'clip-adapter'; an unknown name raises a ValueError listing the known ones."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DECLARED:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(DECLARED)}")
    return key


def options() -> Dict[str, Tuple[Option, List[str]]]:
    """Every method option by dest, with the methods taking it (a flag two methods share, such as
    --reduction, is declared by both and added once)."""
    found: Dict[str, Tuple[Option, List[str]]] = {}
    for name, declared in DECLARED.items():
        for opt in declared.options:
            if opt.dest in found:
                first, users = found[opt.dest]
                if (first.flags, first.kwargs.get("default")) != (opt.flags, opt.kwargs.get("default")):
                    raise ValueError(f"methods {users + [name]} declare option {opt.dest!r} differently")
                users.append(name)
            else:
                found[opt.dest] = (opt, [name])
    return found


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, holding the options it declares first."""
    groups: Dict[str, Any] = {}
    for dest, (opt, users) in options().items():
        owner = users[0]
        if owner not in groups:
            title = (DECLARED[owner].heading
                     or f"{owner} options (another method ignores their values and refuses their switches)")
            groups[owner] = parser.add_argument_group(title)
        kwargs = dict(opt.kwargs)
        if len(users) > 1:
            kwargs["help"] = f"{', '.join(users)}: {kwargs.get('help', '')}"
        groups[owner].add_argument(*opt.flags, **kwargs)


def fixed_on_resume() -> Tuple[str, ...]:
    """The dests of the options that shape a model."""
    return tuple(dest for dest, (opt, _) in options().items() if opt.fixed)
