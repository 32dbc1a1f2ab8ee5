"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024, arXiv 2405.18541) as a baseline: low-rank updates of
the query, key and value projections in every attention layer of both frozen towers.

    q = W_q x + (alpha / r) B_q A_q dropout(x)        (k, v alike; A: r x d, B: d x r)

rank r = 2, alpha = 1, dropout 0.25 on the LoRA branch's input, A Kaiming-uniform and B zero (loralib's
init, which the paper's code uses), so a fresh model computes the frozen CLIP bit for bit. Trained
with the shared loop: classification with the prompt-ensemble text classifier, retrieval with the CLIP
loss. Towers: open_clip's ViT and text transformer (nn.MultiheadAttention) and timm's ViT (its fused
qkv Linear); others are refused. The LoRA parameters live on this model (`lora`); the backbone's
attention modules are wrapped in place to call them. In a training forward with gradients and
dropout, nn.MultiheadAttention's self-attention is written out here (the update acts on dropout(x),
so it cannot be folded into the weight; equal to the module's own within float rounding); every
other forward (evaluation, no_grad, dropout 0) runs the module itself on W + (alpha / r) B A, which
at init is W exactly. timm's qkv Linear adds (alpha / r) B A dropout(x) to its output, exact at init.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nearl.model.frozen import count
from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec

# The tower types whose attention layers are found and wrapped here (nearl/towers/).
SUPPORTED_TOWERS = ("OpenClipVision", "OpenClipText", "TimmVision")


@dataclass
class CLIPLoRAConfig(MethodConfig):
    rank: int = 2
    alpha: float = 1.0  # the update is scaled by alpha / rank
    dropout: float = 0.25

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class LoRA(nn.Module):
    """`parts` low-rank updates (q, k, v: 3) of a d_in -> parts * d_out projection."""

    def __init__(self, d_in: int, d_out: int, parts: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(parts, rank, d_in))
        self.B = nn.Parameter(torch.zeros(parts, d_out, rank))  # zero: the update starts at nothing
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # loralib's (nn.Linear's) init
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    @property
    def dropping(self) -> bool:
        return self.training and self.drop.p > 0

    def weight(self) -> torch.Tensor:
        """(parts * d_out, d_in): the update of the projection's weight."""
        return self.scale * torch.cat(list(self.B @ self.A), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., parts * d_out): the update of the projection's output, dropout on its input."""
        low = torch.einsum("...i,pri->...pr", self.drop(x), self.A.to(x.dtype))
        out = torch.einsum("...pr,por->...po", low, self.B.to(x.dtype))
        return self.scale * out.flatten(-2)


class _Wrapper(nn.Module):
    """Holds its LoRA branch without registering it (it is registered on the method model)."""

    def __init__(self, inner: nn.Module, lora: LoRA):
        super().__init__()
        self.inner = inner
        self.__dict__["lora"] = lora

    def __getattr__(self, name):  # the wrapped module's attributes (num_heads, batch_first, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class LoRALinear(_Wrapper):
    """A frozen nn.Linear (timm's fused qkv) plus its LoRA update (exact at init: B A x is 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.lora(x)


class LoRAMultiheadAttention(_Wrapper):
    """A frozen nn.MultiheadAttention whose in-projection (q, k, v slices of in_proj_weight) gets LoRA."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # a training step's forward (dropout on, gradients on) only: no_grad forwards stay bit for bit the module's
        if (self.lora.dropping and torch.is_grad_enabled() and query is key is value and key_padding_mask is None
                and not need_weights):
            return self._self_attention(query, attn_mask, is_causal), None
        weight = self.inner.in_proj_weight + self.lora.weight().to(self.inner.in_proj_weight.dtype)
        return functional_call(self.inner, {"in_proj_weight": weight}, (query, key, value),
                               dict(key_padding_mask=key_padding_mask, need_weights=need_weights,
                                    attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                    is_causal=is_causal))

    def _self_attention(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        """nn.MultiheadAttention's self-attention written out, LoRA acting on dropout(x)."""
        mha = self.inner
        x = x if mha.batch_first else x.transpose(0, 1)  # (B, L, d)
        b, n, d = x.shape
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias) + self.lora(x)
        q, k, v = (t.reshape(b, n, mha.num_heads, d // mha.num_heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True is masked out; sdpa: True takes part
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        o = mha.out_proj(o.transpose(1, 2).reshape(b, n, d))
        return o if mha.batch_first else o.transpose(0, 1)


def _attention_layers(block: nn.Module):
    """(parent, attribute name, module) of the projections to adapt in one block: open_clip's
    nn.MultiheadAttention (its in_proj_weight), timm's fused qkv Linear (its Attention calls self.qkv(x))."""
    for parent in block.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
                yield parent, name, child
            elif (name == "qkv" and isinstance(child, nn.Linear) and child.out_features == 3 * child.in_features
                  and type(parent).__name__ == "Attention"):
                yield parent, name, child


def add_lora(tower, cfg: CLIPLoRAConfig, kind: str) -> List[LoRA]:
    """Wrap the attention of every block of `tower` in place; its LoRA branches."""
    if type(tower).__name__ not in SUPPORTED_TOWERS:
        raise ValueError(f"clip-lora: the {kind} tower is a {type(tower).__name__}; LoRA is wired here into "
                         f"{', '.join(SUPPORTED_TOWERS)} (open_clip's ViT and text transformer, timm's ViT) only")
    branches = []
    for k, block in enumerate(tower.blocks):
        found = list(_attention_layers(block))
        if not found:
            raise ValueError(f"clip-lora: block {k + 1} of the {kind} tower has no nn.MultiheadAttention or timm "
                             "Attention.qkv")
        for parent, name, layer in found:
            d = layer.embed_dim if isinstance(layer, nn.MultiheadAttention) else layer.in_features
            lora = LoRA(d, d, 3, cfg.rank, cfg.alpha, cfg.dropout)
            wrap = LoRAMultiheadAttention if isinstance(layer, nn.MultiheadAttention) else LoRALinear
            setattr(parent, name, wrap(layer, lora))
            branches.append(lora)
    return branches


class CLIPLoRA(MethodModel):
    method = "clip-lora"

    def __init__(self, backbone: nn.Module, config: Optional[CLIPLoRAConfig] = None, **kw):
        config = config or CLIPLoRAConfig()
        super().__init__(backbone, config, **kw)
        vision = add_lora(self.tower("vision"), config, "vision")
        text = add_lora(self.tower("text"), config, "text")
        self.lora = nn.ModuleDict({"vision": nn.ModuleList(vision), "text": nn.ModuleList(text)})

    def _breakdown(self) -> Dict[str, int]:
        return {f"Vision LoRA (q, k, v; rank {self.config.rank})": count(self.lora["vision"].parameters()),
                f"Text LoRA (q, k, v; rank {self.config.rank})": count(self.lora["text"].parameters())}


SPEC = MethodSpec(  # its aliases and options (--lora-rank, --lora-alpha, --lora-dropout): nearl/methods/options.py
    model_cls=CLIPLoRA, config_cls=CLIPLoRAConfig,
    summary="LoRA on q, k, v of every attention layer of both towers",
    title="CLIP-LoRA",
    untrained_is_zero_shot=True,  # B starts at zero: a fresh model is the frozen CLIP
)
