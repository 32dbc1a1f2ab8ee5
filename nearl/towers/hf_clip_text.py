"""The text tower of a Hugging Face transformers CLIPModel or SiglipModel, and of MetaCLIP 2, OWL-ViT,
OWLv2 (CLIP's) and SigLIP 2 (SigLIP's) (nearl/towers/transformers_backbone.py), stepped as its own forward runs it: token and position
embeddings, the encoder's layers (CLIP's under its causal mask, SigLIP's bidirectional over the
padded text), final_layer_norm, then CLIP's pooling at the end-of-text token and text_projection,
or SigLIP's last token and head."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from nearl.towers.hf_clip_base import HFCLIPTower
from nearl.towers.hf_layers import first_layer_inputs, spliced_embeddings
from nearl.towers.transformers_backbone import BERT_TEXT_TYPES

ARGMAX_TYPES = ("owlvit", "owlv2")  # pooled at the highest token id (the end token in their vocabularies)


class HFCLIPText(HFCLIPTower):
    kind = "text"
    type_name = "transformers CLIPModel / SiglipModel (or CLIP-like) text tower"
    takes_context = True
    tower_attr = "text_model"

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        self.eos_id = self.model.config.eos_token_id

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        return super().accepts(backbone) and backbone.hf.config.model_type not in BERT_TEXT_TYPES

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def context_at(self) -> int:
        """Where learned context goes: after the start token CLIP's tokenizer adds; SigLIP's adds none."""
        return 0 if self.siglip else 1

    def stem(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        return first_layer_inputs(lambda: self.model(input_ids=tokens), self._blocks[0])

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 1) -> Tuple[torch.Tensor, Any]:
        """The context replaces the token embeddings (the position embedding is added to it as to a word)."""
        with spliced_embeddings(self.model.embeddings.token_embedding, context, at):
            return self.stem(tokens)

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings.token_embedding(tokens)

    def end_of_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the position CLIP's text tower pools: the highest id for configs from before
        transformers' eos_token_id fix (eos_token_id = 2) and for OWL-ViT / OWLv2, else the first
        end-of-text token (MetaCLIP 2 always)."""
        ids = tokens.to(torch.int)
        highest = self.model_type in ARGMAX_TYPES or (self.model_type == "clip" and self.eos_id == 2)
        return ids.argmax(dim=-1) if highest else (ids == self.eos_id).int().argmax(dim=-1)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.model.final_layer_norm(x)
        if self.siglip:
            return x[:, -1, :]
        return x[torch.arange(x.shape[0], device=x.device), self.end_of_text(tokens).to(x.device)]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.head(pooled) if self.siglip else self.hf.text_projection(pooled)

    def projection_parameters(self) -> List[nn.Parameter]:
        return list((self.model.head if self.siglip else self.hf.text_projection).parameters())

    def valid_mask(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """CLIP: True up to and including the end-of-text token it pools (causal, as open_clip's
        towers); SigLIP: None, its text tower attends to every position, padding included."""
        if self.siglip:
            return None
        n = tokens.shape[1]
        return torch.arange(n, device=tokens.device)[None, :] <= self.end_of_text(tokens)[:, None]

    def output_dim(self) -> int:
        return int(self.hf.config.projection_dim if not self.siglip else self.model.config.projection_size)
