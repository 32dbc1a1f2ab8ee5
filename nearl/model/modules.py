"""The learnable parts of NEARL-CLIP (SPEC section 3.1), as plain parameter holders.

Matrices are stored the way SPEC applies them (x @ w), so each module's tensors go to the ops
unchanged; `layer_params` assembles the mapping `ops.nearl_layer` takes.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class QueryBank(nn.Module):
    """Q0 (M, D), shared by both towers, and one modality embedding (D) per tower."""

    def __init__(self, num_queries: int, dim: int, towers):
        super().__init__()
        self.q0 = _normal(num_queries, dim, std=1.0)
        self.embed = nn.ParameterDict({t: _normal(dim, std=0.02) for t in towers})

    def initial(self, tower: str) -> torch.Tensor:
        return self.q0 + self.embed[tower]


class USEformer(nn.Module):
    """The query update shared by both towers: W_q, W_o, LN_q, LN_f and the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.w_q = _normal(dim, dim, std=dim ** -0.5)
        self.w_o = _normal(dim, dim, std=dim ** -0.5)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_f = nn.LayerNorm(dim)
        hidden = mlp_ratio * dim
        self.mlp_w1 = _normal(dim, hidden, std=dim ** -0.5)
        self.mlp_b1 = nn.Parameter(torch.zeros(hidden))
        self.mlp_w2 = _normal(hidden, dim, std=hidden ** -0.5)
        self.mlp_b2 = nn.Parameter(torch.zeros(dim))

    def params(self) -> Dict[str, torch.Tensor]:
        return {
            "w_q": self.w_q, "w_o": self.w_o,
            "ln_q_weight": self.ln_q.weight, "ln_q_bias": self.ln_q.bias,
            "ln_f_weight": self.ln_f.weight, "ln_f_bias": self.ln_f.bias,
            "mlp_w1": self.mlp_w1, "mlp_b1": self.mlp_b1, "mlp_w2": self.mlp_w2, "mlp_b2": self.mlp_b2,
        }


class OCALayer(nn.Module):
    """Per-layer OCA weights: W_down (d, r), W_up (r, d) zero-initialised, gate () = 1."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.w_down = _normal(width, rank, std=width ** -0.5)
        self.w_up = nn.Parameter(torch.zeros(rank, width))  # zero: a fresh model is the frozen CLIP
        self.gate = nn.Parameter(torch.ones(()))


class TowerAdapter(nn.Module):
    """Per-tower weights: W_k, W_v (USEformer keys/values), W_ok, W_ov (OCA), and the adapted layers."""

    def __init__(self, width: int, dim: int, rank: int, layers):
        super().__init__()
        self.w_k = _normal(width, dim, std=width ** -0.5)
        self.w_v = _normal(width, dim, std=width ** -0.5)
        self.w_ok = _normal(dim, rank, std=dim ** -0.5)
        self.w_ov = _normal(dim, rank, std=dim ** -0.5)
        self.layers = nn.ModuleDict({str(k): OCALayer(width, rank) for k in layers})

    def oca_parameters(self):
        yield self.w_ok
        yield self.w_ov
        yield from self.layers.parameters()

    def useformer_parameters(self):
        yield self.w_k
        yield self.w_v


def layer_params(tower: TowerAdapter, layer: OCALayer, useformer: USEformer) -> Dict[str, object]:
    """The `params` mapping of ops.nearl_layer for one adapted layer."""
    params: Dict[str, object] = {
        "w_down": layer.w_down, "w_up": layer.w_up, "gate": layer.gate,
        "w_ok": tower.w_ok, "w_ov": tower.w_ov, "w_k": tower.w_k, "w_v": tower.w_v,
        "heads": useformer.heads,
    }
    params.update(useformer.params())
    return params


