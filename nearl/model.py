"""NEARLCLIP: a frozen open_clip backbone stepped block by block, with USEformer and OCA (SPEC 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, NamedTuple, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import NEARLConfig
from .modules import QueryBank, TowerAdapter, USEformer, count, layer_params
from .towers import TextSteps, VisionSteps

# Small architectures of our own (NEARL-Tiny: a CPU-sized ViT for tests and smoke runs).
open_clip.add_model_config(Path(__file__).parent / "model_configs")

SCHEMAS = ("hf-hub:", "local-dir:")


class NEARLOutput(NamedTuple):
    image_features: torch.Tensor  # (B, E), not normalised
    text_features: torch.Tensor  # (B, E)
    image_queries: torch.Tensor  # (B, M, D): the final Q_v
    text_queries: torch.Tensor  # (B, M, D): the final Q_t
    orth_penalty: Optional[torch.Tensor]  # mean cos^2 over adapted layers with orth="soft", else None
    logit_scale: torch.Tensor  # the frozen backbone's exp(logit_scale)


class TowerResult(NamedTuple):
    features: torch.Tensor
    queries: torch.Tensor
    orth_penalty: Optional[torch.Tensor]


def create_backbone(model_name: str, pretrained: Optional[str] = None, **kwargs) -> nn.Module:
    """open_clip.create_model, with `pretrained` also taking 'hf-hub:' / 'local-dir:' sources.

    A tag ('openai', 'laion2b_s34b_b88k') or a checkpoint file goes to open_clip as `pretrained`;
    a schema source names the architecture and weights itself, so it becomes the model name.
    """
    if pretrained is not None and pretrained.startswith(SCHEMAS):
        return open_clip.create_model(pretrained, **kwargs)
    return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)


class NEARLCLIP(nn.Module):
    def __init__(self, backbone: nn.Module, config: Optional[NEARLConfig] = None, *, fused: bool = False,
                 model_name: str = ""):
        super().__init__()
        self.config = config or NEARLConfig()
        self.model_name = model_name
        self.fused = fused
        # Steppers are plain objects, not submodules: they hold references into the backbone.
        self._steps = {"vision": VisionSteps(backbone.visual), "text": TextSteps(backbone)}
        self.backbone = backbone.requires_grad_(False).eval()
        cfg = self.config
        self.queries = QueryBank(cfg.num_queries, cfg.query_dim, ("vision", "text"))
        self.useformer = USEformer(cfg.query_dim, cfg.heads, cfg.mlp_ratio)
        self.adapters = nn.ModuleDict()
        for tower, steps in self._steps.items():
            layers = cfg.layers_for(tower, len(steps.blocks))
            if layers:
                self.adapters[tower] = TowerAdapter(steps.width, cfg.query_dim, cfg.rank, layers)

    # ----------------------------------------------------------------- frozen backbone
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: dropout and friends stay off whatever the adapters do
        return self

    @property
    def impl(self) -> str:
        return "triton" if self.fused else "reference"

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.backbone.logit_scale.detach().exp()

    # ----------------------------------------------------------------- towers
    def _adapt(self, tower: str, x: torch.Tensor, blocks, mask: Optional[torch.Tensor]):
        """Run the blocks of one tower, each adapted block followed by nearl_layer."""
        adapter = self.adapters[tower] if tower in self.adapters else None
        q = self.queries.initial(tower)
        penalties = []
        for k, block in enumerate(blocks, start=1):
            x = block(x)
            if adapter is None or str(k) not in adapter.layers:
                continue
            params = layer_params(adapter, adapter.layers[str(k)], self.useformer)
            # The text mask always holds its first position (TextSteps.valid_mask), so the per-layer
            # check that would synchronise with the GPU is skipped.
            out = ops.nearl_layer(x, q, params, mask=mask, orth=self.config.orth, impl=self.impl,
                                  check_mask_rows=False)
            x, q = out[0], out[1]
            if self.config.orth == "soft":
                cos2 = out[2]
                penalties.append(cos2.mean() if mask is None else cos2[mask].mean())
        if q.dim() == 2:
            q = q.expand(x.shape[0], -1, -1)
        penalty = torch.stack(penalties).mean() if penalties else None
        return x, q, penalty

    def image_tower(self, images: torch.Tensor) -> TowerResult:
        steps = self._steps["vision"]
        blocks = [lambda x, i=i: steps.block(i, x) for i in range(len(steps.blocks))]
        x, q, penalty = self._adapt("vision", steps.stem(images), blocks, None)
        return TowerResult(steps.head(x), q, penalty)

    def text_tower(self, tokens: torch.Tensor) -> TowerResult:
        steps = self._steps["text"]
        x, attn_mask = steps.stem(tokens)
        blocks = [lambda x, i=i: steps.block(i, x, attn_mask) for i in range(len(steps.blocks))]
        x, q, penalty = self._adapt("text", x, blocks, steps.valid_mask(tokens))
        return TowerResult(steps.head(x, tokens), q, penalty)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_tower(images).features
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_tower(tokens).features
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> NEARLOutput:
        image, text = self.image_tower(images), self.text_tower(tokens)
        penalties = [p for p in (image.orth_penalty, text.orth_penalty) if p is not None]
        penalty = torch.stack(penalties).mean() if penalties else None
        return NEARLOutput(image.features, text.features, image.queries, text.queries, penalty, self.logit_scale)

    # ----------------------------------------------------------------- parameters
    def trainable_parameters(self):
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable_parameters(self) -> int:
        return count(self.trainable_parameters())

    def parameter_breakdown(self) -> Dict[str, int]:
        rows = {f"OCA ({t})": count(a.oca_parameters()) for t, a in self.adapters.items()}
        rows.update({f"USEformer keys/values ({t})": count(a.useformer_parameters()) for t, a in self.adapters.items()})
        rows["USEformer shared (W_q, W_o, LN_q, LN_f, MLP)"] = count(self.useformer.parameters())
        rows["Queries (Q0, e_v, e_t)"] = count(self.queries.parameters())
        rows["OCA total"] = sum(v for k, v in rows.items() if k.startswith("OCA ("))
        rows["USEformer total"] = sum(v for k, v in rows.items() if k.startswith(("USEformer", "Queries")))
        rows["Total learnable"] = self.num_trainable_parameters()
        rows["Frozen backbone"] = count(self.backbone.parameters())
        return rows

    def format_parameter_breakdown(self) -> str:
        rows = self.parameter_breakdown()
        width = max(len(k) for k in rows)
        lines = [f"NEARL-CLIP parameters ({self.model_name or type(self.backbone).__name__})"]
        lines += [f"  {k:<{width}}  {v:>12,}" for k, v in rows.items()]
        return "\n".join(lines)

    def print_parameter_breakdown(self) -> None:
        print(self.format_parameter_breakdown())

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The learnable parameters only: what a checkpoint needs besides the backbone's name."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"adapter state does not match this model: missing {missing[:5]}, unexpected {extra[:5]}")
        self.load_state_dict(state, strict=False)

    # ----------------------------------------------------------------- data helpers
    def image_transform(self, train: bool = False):
        """open_clip's own preprocessing for this backbone."""
        from open_clip.transform import PreprocessCfg, image_transform_v2
        return image_transform_v2(PreprocessCfg(**self.backbone.visual.preprocess_cfg), is_train=train)

    def tokenizer(self):
        return open_clip.get_tokenizer(self.model_name)


def build(model_name: str, pretrained: Optional[str] = None, fused: bool = False, **config) -> NEARLCLIP:
    """A NEARL-CLIP model around a frozen open_clip backbone.

    model_name: an open_clip architecture ('ViT-B-16', 'NEARL-Tiny', or an 'hf-hub:' / 'local-dir:'
    source); pretrained: an open_clip tag, a checkpoint file, or an 'hf-hub:' / 'local-dir:' source
    (None: random weights, offline). config: NEARLConfig fields (num_queries, query_dim, heads, rank,
    vision_layers, text_layers, orth, lambda_q, lambda_orth, ...).
    """
    backbone = create_backbone(model_name, pretrained)
    name = pretrained if pretrained is not None and pretrained.startswith(SCHEMAS) else model_name
    return NEARLCLIP(backbone, NEARLConfig(**config), fused=fused, model_name=name)
