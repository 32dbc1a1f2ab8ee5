"""open_clip's CoCa text tower: a TextTransformer that appends a class token (`cls_emb`) after the
text, stepped as open_clip runs it: token embeddings, the class token, position embeddings, the
resblocks under the causal mask joined with the padding mask (`_embeds` builds both, the class
token included), then the class token pooled, ln_final after pooling, text_projection. The
rest (blocks, projection, learned context) is open_clip_text.py's."""
from __future__ import annotations

import torch
from open_clip.transformer import TextTransformer
from torch import nn

from nearl.towers.open_clip_text import OpenClipText


class CoCaText(OpenClipText):
    type_name = "open_clip CoCa text transformer (a class token appended)"

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        text = getattr(backbone, "text", None)
        return isinstance(text, TextTransformer) and text.cls_emb is not None

    @property
    def context_length(self) -> int:
        """The tokenizer's context: the position embedding holds one more row, the class token's."""
        return int(self.src.positional_embedding.shape[0]) - 1

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.src.ln_final(x[:, -1])  # open_clip normalises after pooling here

    def valid_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N + 1): what the pooled class token attends to, the keys open_clip's mask lets through:
        the text up to its padding, and one always-valid key for the class token. Released CoCa
        weights were trained with that key first, shifting the padding by one (correct_cls_mask off)."""
        valid = tokens != self.src.pad_id
        cls = torch.ones_like(valid[:, :1])
        return torch.cat([valid, cls] if getattr(self.src, "correct_cls_mask", False) else [cls, valid], dim=1)
