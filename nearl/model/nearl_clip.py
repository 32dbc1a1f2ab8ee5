"""NEARLCLIP: a frozen open_clip backbone stepped block by block, with USEformer and OCA (SPEC 3)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Optional

import open_clip
import torch
from torch import nn

from nearl.towers import downloads, transformers_backbone
from nearl.towers.sources import backbone_name, parse

from nearl import ops
from nearl.model.config import NEARLConfig
from nearl.errors import UserError
from nearl.model.frozen import BackboneSource, FrozenCLIPWrapper, count
from nearl.model.modules import QueryBank, TowerAdapter, USEformer, layer_params

# Small architectures of our own (NEARL-Tiny: a CPU-sized ViT for tests and smoke runs).
open_clip.add_model_config(Path(__file__).parent / "model_configs")


class NEARLOutput(NamedTuple):
    image_features: torch.Tensor  # (B, E), not normalised
    text_features: torch.Tensor  # (B, E)
    image_queries: Optional[torch.Tensor]  # (B, M, D): the final Q_v (None: the image tower is not adapted)
    text_queries: Optional[torch.Tensor]  # (B, M, D): the final Q_t (None: the text tower is not adapted)
    orth_penalty: Optional[torch.Tensor]  # mean cos^2 over adapted layers with orth="soft", else None
    logit_scale: torch.Tensor  # the frozen backbone's exp(logit_scale)
    logit_bias: Optional[torch.Tensor] = None  # SigLIP backbones' learned bias (their loss is SigLIP's); else None


class TowerResult(NamedTuple):
    features: torch.Tensor
    queries: Optional[torch.Tensor]  # None for a tower left frozen (config.towers)
    orth_penalty: Optional[torch.Tensor]


def create_backbone(model_name: str, pretrained: Optional[str] = None, **kwargs) -> nn.Module:
    """open_clip.create_model, with `pretrained` also taking 'hf-hub:' / 'local-dir:' sources, and
    transformers CLIP-family checkpoints (CLIPModel, SiglipModel, ...: docs/backbones.md) named
    'transformers:<repo id or folder>'.

    A tag ('openai', 'laion2b_s34b_b88k') or a checkpoint file goes to open_clip as `pretrained`;
    a schema source names the architecture and weights itself, so it becomes the model name. A
    'transformers:' model name with no pretrained source builds random weights from its config.
    Weights that cannot be downloaded (no network) are one UserError naming the source and the ways
    to give them offline (nearl/towers/downloads.py).
    """
    with downloads.downloading(model_name, pretrained):
        return _create_backbone(model_name, pretrained, **kwargs)


def _create_backbone(model_name: str, pretrained: Optional[str] = None, **kwargs) -> nn.Module:
    source, named = parse(pretrained), parse(model_name)
    if source.kind == "transformers":
        return transformers_backbone.create(source.value, weights=True)
    if named.kind == "transformers":
        if pretrained is not None:
            raise UserError(f"pretrained={pretrained!r} cannot weight {model_name!r}: give pretrained="
                             f"'{model_name}' for its own weights, or none for random weights")
        return transformers_backbone.create(named.value, weights=False)
    downloads.check_reachable(model_name, pretrained)  # not cached and no network: said now, not after retries
    if source.is_schema:
        return open_clip.create_model(pretrained, **kwargs)
    if pretrained is None:  # random weights, offline: not even a Hugging Face text tower's own weights
        kwargs.setdefault("pretrained_hf", False)
    return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)


class NEARLCLIP(FrozenCLIPWrapper):
    title = "NEARL-CLIP"
    method = "nearl"  # its name in nearl.methods (nearl/methods/nearl.py)
    tasks = ("retrieval", "classification", "multilabel")

    def __init__(self, backbone: nn.Module, config: Optional[NEARLConfig] = None, *, fused: bool = False,
                 model_name: str = ""):
        super().__init__(backbone, model_name=model_name)
        self.config = config or NEARLConfig()
        self.fused = fused
        cfg = self.config
        # Only the adapted towers are stepped through the seam (nearl.towers): a tower left out of
        # config.towers runs as the backbone runs it, so it may be one no seam steps (CoCa's text, a CNN).
        self.queries = QueryBank(cfg.num_queries, cfg.query_dim, tuple(k for k in ("vision", "text") if k in cfg.towers))
        self.useformer = USEformer(cfg.query_dim, cfg.heads, cfg.mlp_ratio)
        self.adapters = nn.ModuleDict()
        for kind in (k for k in ("vision", "text") if k in cfg.towers):
            tower = self.tower(kind)
            layers = cfg.layers_for(kind, tower.depth)
            if layers:
                self.adapters[kind] = TowerAdapter(tower.width, cfg.query_dim, cfg.rank, layers)

    @property
    def impl(self) -> str:
        return "triton" if self.fused else "reference"

    # ----------------------------------------------------------------- towers
    def _adapt(self, kind: str, inputs: torch.Tensor) -> TowerResult:
        """Run one tower, each adapted block followed by nearl_layer; a tower not in config.towers runs
        frozen, as the backbone runs it, and has no queries."""
        if kind not in self.config.towers:
            encode = self.backbone.encode_image if kind == "vision" else self.backbone.encode_text
            return TowerResult(encode(inputs), None, None)
        tower = self.tower(kind)
        x, attn_mask = tower.stem(inputs)
        mask = tower.valid_mask(inputs)
        adapter = self.adapters[kind] if kind in self.adapters else None
        q = self.queries.initial(kind)
        penalties = []
        for k in range(1, tower.depth + 1):
            x = self.run_block(tower, k - 1, x, attn_mask)
            if adapter is None or str(k) not in adapter.layers:
                continue
            params = layer_params(adapter, adapter.layers[str(k)], self.useformer)
            # The text mask always holds its first position (OpenClipText.valid_mask), so the per-layer
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
        return TowerResult(tower.head(x, inputs), q, penalty)

    def image_tower(self, images: torch.Tensor) -> TowerResult:
        return self._adapt("vision", images)

    def text_tower(self, tokens: torch.Tensor) -> TowerResult:
        return self._adapt("text", tokens)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> NEARLOutput:
        image, text = self.image_tower(images), self.text_tower(tokens)
        penalties = [p for p in (image.orth_penalty, text.orth_penalty) if p is not None]
        penalty = torch.stack(penalties).mean() if penalties else None
        return NEARLOutput(image.features, text.features, image.queries, text.queries, penalty, self.logit_scale,
                           self.logit_bias)

    # ----------------------------------------------------------------- parameters
    def decays(self, name: str, p: torch.Tensor) -> bool:
        """NEARL-CLIP's AdamW rule: decay on weight matrices; none on gates, LayerNorms, biases and
        the query bank (Q0, e_v, e_t)."""
        return p.ndim >= 2 and not name.startswith("queries.")

    def parameter_breakdown(self) -> Dict[str, int]:
        rows = {f"OCA ({t})": count(a.oca_parameters()) for t, a in self.adapters.items()}
        rows.update({f"USEformer keys/values ({t})": count(a.useformer_parameters()) for t, a in self.adapters.items()})
        rows["USEformer shared (W_q, W_o, LN_q, LN_f, MLP)"] = count(self.useformer.parameters())
        rows["Queries (Q0, e_v, e_t)"] = count(self.queries.parameters())
        rows["OCA total"] = sum(v for k, v in rows.items() if k.startswith("OCA ("))
        rows["USEformer total"] = sum(v for k, v in rows.items() if k.startswith(("USEformer", "Queries")))
        rows.update(super().parameter_breakdown())
        return rows


def build(model_name: str, pretrained: Optional[str] = None, fused: bool = False, *, seed: Optional[int] = None,
          **config) -> NEARLCLIP:
    """A NEARL-CLIP model around a frozen CLIP-style backbone.

    model_name: an open_clip architecture ('ViT-B-16', 'NEARL-Tiny', or an 'hf-hub:' / 'local-dir:'
    source), or 'transformers:<repo id or folder>' for a transformers CLIP-family model;
    pretrained: an open_clip tag, a checkpoint file, or an 'hf-hub:' / 'local-dir:' /
    'transformers:' source (None: random weights, offline when the config is local).
    config: NEARLConfig fields (num_queries, query_dim, heads, rank, vision_layers, text_layers, orth,
    lambda_q, lambda_orth, ...).
    seed: None draws the initial weights (a random backbone's included) from the global generator, as
    before; an int draws them from torch.manual_seed(seed) without touching it, as
    nearl.methods.build_method does (the same model), so `save_pretrained` can record a random backbone.
    """
    with _drawn_from(seed):
        backbone = create_backbone(model_name, pretrained)
        model = NEARLCLIP(backbone, NEARLConfig(**config), fused=fused,
                          model_name=backbone_name(model_name, pretrained))
    model.backbone_source = BackboneSource(model_name, pretrained, seed)
    return model


@contextmanager
def _drawn_from(seed: Optional[int]) -> Iterator[None]:
    """Random draws inside from torch.manual_seed(seed), the global generators left as they were (None:
    from the global generators themselves)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
