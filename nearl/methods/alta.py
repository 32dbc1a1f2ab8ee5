"""ALTA (IEEE TMI 2025, "Efficient Medical Vision-Language Alignment Through Adapting Masked Vision
Models") on an open_clip backbone, as a baseline.

In every block of both towers, two bottleneck adapters (AIM style: Linear d -> d/r, GELU,
Linear d/r -> d, the up-projection zero-initialised, r = 4):

    x = x + ls_1(attn(ln_1(x)))                      # the frozen block's attention
    x = x + adapter_attn(x)                          # after the attention, with its own skip
    h = ln_2(x)
    x = x + ls_2(mlp(h)) + 0.5 * adapter_mlp(h)      # parallel to the frozen MLP, scaled by 0.5

In post-norm blocks (BERT, BiomedCLIP's text tower) the same two adapters sit where the residual
stream is after attention, x1 = LN1(x + attn(x)) + adapter_attn(.), and beside the MLP, inside
LN2: LN2(x1 + mlp(x1) + 0.5 * adapter_mlp(x1)) (`Tower.adapted_block`).

Every LayerNorm of the backbone and the final projections (visual.proj, text_projection; ln_post
and ln_final are among the LayerNorms) are trained too; everything else stays frozen. Since the
up-projections start at zero, a fresh model computes exactly the frozen CLIP.

Multi-view (`multiview=True`): a study may give up to four views, in the slot order of
`nearl.methods.multiview.VIEW_SLOTS` (frontal/current, lateral/current, frontal/prior,
lateral/prior). Each view goes through the image tower with a learned view embedding (frontal,
lateral) and time embedding (current, prior) added to its tokens after the stem (both
zero-initialised), and the image embedding is the projection of the mean of the present views'
pooled features (absent views are left out of the mean, by `view_mask`). A single frontal current
view, as at evaluation, is the plain single-view model plus the (learned) frontal/current embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nearl.errors import UserError
from nearl.model.frozen import count
from nearl.model.nearl_clip import NEARLOutput, TowerResult
from nearl.towers import Tower
from nearl.methods.base import MethodConfig, MethodModel
from nearl.methods.registry import MethodSpec

# slot -> (view: 0 frontal / 1 lateral, time: 0 current / 1 prior); the order of multiview.VIEW_SLOTS
SLOT_VIEW = (0, 1, 0, 1)
SLOT_TIME = (0, 0, 1, 1)


@dataclass
class ALTAConfig(MethodConfig):
    reduction: int = 4  # adapter bottleneck d -> d / reduction
    mlp_scale: float = 0.5  # weight of the adapter parallel to the MLP
    multiview: bool = False  # learned view / time embeddings, mean over the views of a study

    def __post_init__(self):
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise ValueError(f"reduction must be a positive int, got {self.reduction!r}")


class Adapter(nn.Module):
    """Linear d -> d/r, GELU, Linear d/r -> d; the up-projection starts at zero."""

    def __init__(self, width: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, width // reduction)
        self.down = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class BlockAdapters(nn.Module):
    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.attn = Adapter(width, reduction)
        self.mlp = Adapter(width, reduction)


def additions(adapters: BlockAdapters, mlp_scale: float):
    """The two ALTA adapters as `Tower.adapted_block` takes them: the attention adapter on the residual
    stream after attention (with its own skip), the MLP adapter beside the MLP, scaled."""
    return (lambda h: h + adapters.attn(h)), (lambda h: mlp_scale * adapters.mlp(h))


def adapted_block(tower: Tower, k: int, x: torch.Tensor, adapters: BlockAdapters, mlp_scale: float,
                  attn_mask=None) -> torch.Tensor:
    """Block k of `tower` with the two ALTA adapters (`Tower.adapted_block` puts them there for
    pre-norm and for BERT's post-norm blocks)."""
    return tower.adapted_block(k, x, attn_mask, *additions(adapters, mlp_scale))


class ALTA(MethodModel):
    method = "alta"

    def __init__(self, backbone: nn.Module, config: Optional[ALTAConfig] = None, **kw):
        config = config or ALTAConfig()
        super().__init__(backbone, config, **kw)
        self.adapters = nn.ModuleDict()
        for kind in ("vision", "text"):
            tower = self.tower(kind)
            tower.check_adapted_blocks()  # a ValueError here for blocks the adapters cannot go into
            self.adapters[kind] = nn.ModuleList(BlockAdapters(tower.width, config.reduction) for _ in tower.blocks)
        # The backbone parts ALTA trains: every LayerNorm and the two final projections.
        self._unfrozen_norms: List[nn.Parameter] = []
        for m in backbone.modules():
            if isinstance(m, nn.LayerNorm):
                for p in m.parameters():
                    p.requires_grad_(True)
                    self._unfrozen_norms.append(p)
        self._unfrozen_proj: List[nn.Parameter] = []
        for kind in ("vision", "text"):
            for p in self.tower(kind).projection_parameters():
                p.requires_grad_(True)
                self._unfrozen_proj.append(p)
        if config.multiview:
            width = self.tower("vision").width
            self.view_embed = nn.Parameter(torch.zeros(2, width))  # frontal, lateral
            self.time_embed = nn.Parameter(torch.zeros(2, width))  # current, prior
            self.register_buffer("slot_view", torch.tensor(SLOT_VIEW), persistent=False)
            self.register_buffer("slot_time", torch.tensor(SLOT_TIME), persistent=False)
        else:
            self.view_embed = self.time_embed = None

    @property
    def num_views(self) -> int:
        return len(SLOT_VIEW) if self.config.multiview else 1

    # ----------------------------------------------------------------- towers
    def _run(self, kind: str, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        tower = self.tower(kind)
        for k, ad in enumerate(self.adapters[kind]):
            x = self.run_block(tower, k, x, attn_mask, additions(ad, self.config.mlp_scale))
        return x

    def _slot_embedding(self, slots: torch.Tensor) -> torch.Tensor:
        """(P,) slot indices -> (P, 1, width) view + time embedding."""
        return (self.view_embed[self.slot_view[slots]] + self.time_embed[self.slot_time[slots]]).unsqueeze(1)

    def _pooled(self, images: torch.Tensor, slots: Optional[torch.Tensor]) -> torch.Tensor:
        tower = self.tower("vision")
        x, attn_mask = tower.stem(images)
        if self.view_embed is not None:
            if slots is None:
                slots = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            x = x + self._slot_embedding(slots).to(x.dtype)
        return tower.pool(self._run("vision", x, attn_mask), images)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.tower("vision").project(pooled)

    def image_tower(self, images: torch.Tensor, view_mask: Optional[torch.Tensor] = None) -> TowerResult:
        """images (B, 3, H, W): one frontal current view; or (B, V, 3, H, W) with view_mask (B, V)."""
        if images.dim() == 4:
            return TowerResult(self._project(self._pooled(images, None)), None, None)
        if images.dim() != 5:
            raise ValueError(f"images must be (B, 3, H, W) or (B, V, 3, H, W), got {tuple(images.shape)}")
        B, V = images.shape[:2]
        if V > self.num_views:
            raise ValueError(f"{V} views per sample, but this model takes at most {self.num_views} "
                             f"({'multiview=True' if self.config.multiview else 'build it with multiview=True'})")
        if view_mask is None:
            view_mask = torch.ones(B, V, dtype=torch.bool, device=images.device)
        if view_mask.shape != (B, V):
            raise ValueError(f"view_mask must be {(B, V)}, got {tuple(view_mask.shape)}")
        view_mask = view_mask.to(device=images.device, dtype=torch.bool)
        counts = view_mask.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("a sample has no view at all (view_mask row all False)")
        present = view_mask.reshape(-1).nonzero().squeeze(1)  # flat (b * V + v) of the present views
        slots = present % V
        pooled = self._pooled(images.reshape(B * V, *images.shape[2:])[present], slots)
        total = pooled.new_zeros(B, pooled.shape[-1]).index_add_(0, present // V, pooled)
        mean = total / counts.to(pooled.dtype).unsqueeze(1)
        return TowerResult(self._project(mean), None, None)

    def text_tower(self, tokens: torch.Tensor) -> TowerResult:
        tower = self.tower("text")
        x, attn_mask = tower.stem(tokens)
        return TowerResult(tower.head(self._run("text", x, attn_mask), tokens), None, None)

    def encode_image(self, images: torch.Tensor, normalize: bool = False,
                     view_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        features = self.image_tower(images, view_mask).features
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, view_mask: Optional[torch.Tensor] = None):
        return NEARLOutput(self.image_tower(images, view_mask).features, self.text_tower(tokens).features,
                           None, None, None, self.logit_scale, self.logit_bias)

    # ----------------------------------------------------------------- parameters
    def decays(self, name: str, p: torch.Tensor) -> bool:
        # adapter matrices only: the unfrozen LayerNorms / projections keep their pretrained values as
        # the prior (decaying them toward zero would fight the backbone), embeddings start at zero
        return name.startswith("adapters.") and p.ndim >= 2

    def _breakdown(self) -> Dict[str, int]:
        rows = {f"Adapters ({t})": count(a.parameters()) for t, a in self.adapters.items()}
        rows["LayerNorms (unfrozen)"] = count(self._unfrozen_norms)
        rows["Projections (unfrozen)"] = count(self._unfrozen_proj)
        if self.view_embed is not None:
            rows["View / time embeddings"] = self.view_embed.numel() + self.time_embed.numel()
        return rows


def _check_options(config) -> None:
    """config: the run's TrainConfig."""
    if config.option("multiview") and config.task != "retrieval":
        raise UserError(f"--multiview is an option of method 'alta' with task 'retrieval' (got task {config.task!r})")


SPEC = MethodSpec(  # its options (--reduction, --multiview, --view-columns): nearl/methods/options.py
    model_cls=ALTA, config_cls=ALTAConfig, check=_check_options,
    summary="ALTA adapters in every block of both towers",
)
