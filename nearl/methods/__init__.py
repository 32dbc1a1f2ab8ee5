"""Adaptation methods compared on the same backbone, data, seeds and budget.

    model = build_method("alta", "ViT-B-16", "openai", seed=0, multiview=True)

Every method returns an nn.Module with NEARLCLIP's interface (see nearl/methods/base.py), so
training, evaluation and the checkpoints treat them alike; the hooks a method may override
(class_prompt_tokens, prompt_tower, classification_logits, decays, num_views) are declared with
their defaults on nearl.model.frozen.FrozenCLIPWrapper, which NEARLCLIP and MethodModel derive from. Each
method's module declares a `MethodSpec` named SPEC (registry.py): its model and config classes,
tasks, and what callers treat differently (its title, whether it scores unseen classes, ...). Its aliases and
command-line options are declared, without torch, in options.py (so --help lists them without
importing the methods). A new method is a new module here and its entry in options.py (DECLARED,
whose order is that of listings); the registry imports it on first use.

    nearl         NEARL-CLIP itself (nearl.build)                       retrieval, classification
    alta          ALTA adapters in every block of both towers          retrieval, classification
    clip-adapter  residual bottleneck MLPs on the final features       retrieval, classification
    coop          learned prompt context (M = 16)                      classification
    biomedcoop    coop + LLM class descriptions' consistency and KD    classification
    linear-probe  logistic regression on frozen image features         classification
    zeroshot      the frozen CLIP with prompt templates, no training   retrieval, classification
    tip-adapter   training-free cache model of the few-shot features   classification
    tip-adapter-f Tip-Adapter with its cache keys fine-tuned            classification
    clip-lora     LoRA on q, k, v of every attention layer, both towers retrieval, classification

A random backbone (pretrained=None) is drawn under torch.manual_seed(seed) before anything else,
so every method built with one seed wraps the very same backbone weights.
"""
from nearl._lazy import lazy_attributes
from nearl.methods.options import DECLARED, DEFAULT_METHOD

# Loaded on first use (PEP 562): `nearl.methods.options` serves the command lines' --help without
# torch, which the methods and their registry import.
_REGISTRY = ("MethodSpec", "Option", "add_method_options", "build_from_checkpoint", "build_method", "canonical",
             "check_options", "check_task", "config_fields", "fixed_on_resume", "method_config", "method_of",
             "methods_for", "names", "register", "spec")
_LAZY = {**{name: "registry" for name in _REGISTRY}, "MethodConfig": "base", "MethodModel": "base"}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

METHODS = tuple(DECLARED)  # every method's name, in listing order (the registry's names(), by test)
METHOD_MODULES = tuple(name.replace("-", "_") for name in DECLARED)

__all__ = ["DEFAULT_METHOD", "METHODS", "METHOD_MODULES", *sorted(_LAZY)]
