"""Stepping a Hugging Face transformers encoder layer by layer, whatever the version.

A layer's arguments besides the tokens (the attention mask in whatever form this version and
attention implementation build it, and the rest) are taken from the model's own forward: it runs
up to its first layer, and what that layer is called with is passed to every layer again. So a
stepped tower computes what the model computes, in transformers 4.5x (per-layer arguments,
tuple outputs) and 5.x (keyword arguments, tensor outputs) alike.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn


class _FirstLayerReached(Exception):
    """Stops a forward once its first layer's inputs are known."""


def first_layer_inputs(run: Callable[[], Any], first_layer: nn.Module) -> Tuple[torch.Tensor, Any]:
    """(the tokens `first_layer` receives, (its other args, its kwargs)) when `run()` runs the model."""
    x, layer_args, _ = first_layer_call(run, first_layer)
    return x, layer_args


def first_layer_call(run: Callable[[], Any], first_layer: nn.Module,
                     inner: Optional[nn.Module] = None) -> Tuple[torch.Tensor, Any, Any]:
    """As first_layer_inputs, and with `inner` (a module the first layer calls) the run goes on until
    `inner` has returned: (tokens, layer args, inner's output; None without `inner`). T5's first
    layer computes the position bias every layer is then given."""
    seen = {}

    def capture(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        if inner is None:
            raise _FirstLayerReached

    def after_inner(module, args, output):
        seen["inner"] = output
        raise _FirstLayerReached

    hooks = [first_layer.register_forward_pre_hook(capture, with_kwargs=True)]
    if inner is not None:
        hooks.append(inner.register_forward_hook(after_inner))
    try:
        run()
    except _FirstLayerReached:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if "args" not in seen:
        raise RuntimeError(f"the model's forward never called its first layer ({type(first_layer).__name__})")
    args, kwargs = seen["args"], dict(seen["kwargs"])
    x = args[0] if args else kwargs.pop("hidden_states")
    return x, (args[1:], kwargs), seen.get("inner")


def call_layer(layer: nn.Module, x: torch.Tensor, layer_args: Any) -> torch.Tensor:
    """`layer` on x with the arguments `first_layer_inputs` found."""
    args, kwargs = layer_args
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x the tensor


@contextlib.contextmanager
def spliced_embeddings(embedding: nn.Embedding, context: torch.Tensor, at: int):
    """While open, `embedding`'s output holds `context` (n, width) at positions at .. at + n - 1 in
    place of the tokens' own embeddings (CoOp's learned context, placed as words are)."""
    n = context.shape[0]

    def splice(module, args, out):
        ctx = context.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :at], ctx, out[:, at + n:]], dim=1)

    hook = embedding.register_forward_hook(splice)
    try:
        yield
    finally:
        hook.remove()


class _AttentionDone(Exception):
    pass


def branch_output(layer: nn.Module, branch: nn.Module, x: torch.Tensor, layer_args: Any) -> torch.Tensor:
    """What `branch` (a module inside `layer`, its attention) returns, the first tensor of it, when
    `layer` runs on x with `layer_args`; the layer is stopped there."""
    seen = {}

    def on_branch(module, args, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output
        raise _AttentionDone

    hook = branch.register_forward_hook(on_branch)
    try:
        call_layer(layer, x, layer_args)
    except _AttentionDone:
        pass
    finally:
        hook.remove()
    return seen["out"]


def prenorm_adapted_layer(layer: nn.Module, x: torch.Tensor, layer_args: Any,
                          after_attention: Callable[[torch.Tensor], torch.Tensor],
                          beside_mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A CLIP / SigLIP encoder layer (x + attn(LN1 x), then + mlp(LN2 x)) with ALTA's two additions.
    The attention branch runs inside the layer's own forward (its arguments differ across versions)
    and is stopped once known; the MLP half, whose call is the same everywhere, runs here."""
    x = after_attention(x + branch_output(layer, layer.self_attn, x, layer_args))
    h = layer.layer_norm2(x)
    return x + layer.mlp(h) + beside_mlp(h)


def check_prenorm_layers(layers, kind: str) -> None:
    for layer in layers:
        if not all(hasattr(layer, name) for name in ("self_attn", "layer_norm2", "mlp")):
            raise ValueError(f"the {kind} tower has {type(layer).__name__} layers; adapters go into CLIP-style "
                             "layers (self_attn, layer_norm2, mlp) only")
