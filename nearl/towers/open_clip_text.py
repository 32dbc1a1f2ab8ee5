"""open_clip's CLIP text transformer, inline in CLIP or as a TextTransformer, stepped as open_clip
runs it: token and position embeddings, the resblocks under the causal mask, ln_final, pooling at
the end-of-text token, text_projection."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from nearl.towers.base import PreNormParts, Tower
from nearl.towers.open_clip_blocks import prenorm_parts, run_block


class OpenClipText(Tower):
    kind = "text"
    type_name = "open_clip text transformer"
    takes_context = True

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone)
        text = getattr(backbone, "text", None)
        if text is not None:
            self.src, self.pool_type, self.eos_id = text, text.pool_type, getattr(text, "eos_id", None)
        else:
            self.src, self.pool_type = backbone, backbone.text_pool_type
            self.eos_id = getattr(backbone, "text_eos_id", None)
        self.transformer = self.src.transformer
        self._blocks = list(self.transformer.resblocks)

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        text = getattr(backbone, "text", None)
        if text is not None:  # CoCa-style towers append a class token: open_clip_coca_text.py
            return isinstance(text, TextTransformer) and text.cls_emb is None
        return hasattr(backbone, "token_embedding") and hasattr(backbone, "transformer")

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        text = getattr(backbone, "text", None)
        if isinstance(text, TextTransformer) and text.cls_emb is not None:
            return "a TextTransformer that appends a class token (CoCa-style embed_cls)"
        if text is not None:
            return f"a text tower of type {type(text).__name__}"
        return f"{type(backbone).__name__} without an open_clip text transformer"

    @property
    def width(self) -> int:
        return self.transformer.width

    @property
    def blocks(self) -> List[nn.Module]:
        return self._blocks

    @property
    def context_length(self) -> int:
        return int(self.src.positional_embedding.shape[0])

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 1
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stem adds the position embedding to the token embeddings; at the context's positions
        it adds it to the context instead."""
        x, attn_mask = self.stem(tokens)
        n = context.shape[0]
        pos = self.src.positional_embedding[at:at + n].to(x.dtype)
        ctx = (context.to(x.dtype) + pos).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :at], ctx, x[:, at + n:]], dim=1), attn_mask

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.src.token_embedding(tokens)

    def stem(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(self.src, TextTransformer):
            return self.src._embeds(tokens)
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.src.token_embedding(tokens).to(cast_dtype)
        return x + self.src.positional_embedding.to(cast_dtype), self.src.attn_mask

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_block(self._blocks[k], x, self.transformer.batch_first, attn_mask)

    def prenorm_parts(self, k: int) -> PreNormParts:
        return prenorm_parts(self._blocks[k], self.transformer.batch_first, self.kind)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return text_global_pool(self.src.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        proj = self.src.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def projection_parameters(self) -> List[nn.Parameter]:
        proj = self.src.text_projection
        if proj is None:
            return []
        return [proj] if isinstance(proj, nn.Parameter) else list(proj.parameters())

    def valid_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """text_valid (B, N): True up to and including the end-of-text token the head pools."""
        n = tokens.shape[1]
        if self.pool_type == "argmax":
            eot = tokens.argmax(dim=-1)
        elif self.pool_type == "eos" and self.eos_id is not None:
            eot = (tokens == self.eos_id).int().argmax(dim=-1)
        else:  # first / last pooling: every position may matter
            return torch.ones_like(tokens, dtype=torch.bool)
        return torch.arange(n, device=tokens.device)[None, :] <= eot[:, None]
