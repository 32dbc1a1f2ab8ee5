"""The BERT-style text tower of a Hugging Face transformers ChineseCLIPModel (BERT), AltCLIPModel
(XLM-RoBERTa, then its pre_LN and transformation) or BlipModel (BLIP's BERT, with its pooler)
(nearl/towers/transformers_backbone.py), stepped as its own forward runs it: the embeddings, the
encoder's post-norm layers under the padding mask the model builds from its tokenizer's, then the
pooling its model's text features use (the [CLS] / <s> token: ChineseCLIP's as it is, AltCLIP's
after pre_LN and transformation, BLIP's through its pooler) and text_projection.

The layers are stepped, and ALTA's additions placed, as hf_text.py does it for open_clip's
HFTextEncoder (the same transformers layer classes)."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from nearl.towers.base import Tower
from nearl.towers.hf_clip_base import hf_clip_model
from nearl.towers.hf_text import HFText
from nearl.towers.transformers_backbone import BERT_TEXT_TYPES


class HFBertText(HFText):
    kind = "text"
    type_name = "transformers ChineseCLIPModel / AltCLIPModel / BlipModel text tower (BERT-style)"
    takes_context = True

    def __init__(self, backbone: nn.Module):
        Tower.__init__(self, backbone)
        self.backbone = backbone
        self.hf = hf_clip_model(backbone)
        self.model_type = self.hf.config.model_type
        self.text_model = self.hf.text_model
        self.model = getattr(self.text_model, "roberta", self.text_model)  # AltCLIP's XLM-R sits inside
        encoder = self.model.encoder
        self._blocks = list(encoder.layer if hasattr(encoder, "layer") else encoder.layers)  # AltCLIP 5.x: layers
        self.pad_id = self.hf.config.text_config.pad_token_id

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        hf = hf_clip_model(backbone)
        return hf is not None and hf.config.model_type in BERT_TEXT_TYPES

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        return f"{type(backbone).__name__}, not a transformers ChineseCLIPModel / AltCLIPModel / BlipModel"

    @property
    def width(self) -> int:
        return int(self.hf.config.text_config.hidden_size)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.model_type == "altclip":  # every token through pre_LN and transformation, then <s>
            return self.text_model.transformation(self.text_model.pre_LN(x))[:, 0]
        if self.model_type == "blip":
            return self.text_model.pooler(x)
        return x[:, 0, :]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.hf.text_projection(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        return list(self.hf.text_projection.parameters())

    def output_dim(self) -> int:
        return int(self.hf.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.backbone.context_length)
