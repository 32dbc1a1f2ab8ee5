"""Stepping an open_clip tower block by block: stem, blocks, head, exactly as open_clip does.

Only open_clip's native towers are supported (VisionTransformer; the CLIP text transformer inline
or as TextTransformer). Other towers (timm, Hugging Face, ModifiedResNet) cannot be stepped block by
block and raise a ValueError saying which tower was found.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool


def _run_block(block, x, transformer, attn_mask):
    # Our loop keeps x batch-first (B, N, d); a sequence-first stack gets it transposed per block.
    if transformer.batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


class VisionSteps:
    """vision_stem / vision_block[k] / vision_head of SPEC section 3 for open_clip's VisionTransformer."""

    def __init__(self, visual):
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"the image tower is {type(visual).__name__}; NEARL-CLIP steps only open_clip's "
                             "VisionTransformer block by block (timm, Hugging Face and ResNet towers are not supported)")
        self.visual = visual
        self.blocks = list(visual.transformer.resblocks)
        self.width = visual.transformer.width

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(images)

    def block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return _run_block(self.blocks[k], x, self.visual.transformer, None)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TextSteps:
    """text_stem / text_block[k] / text_head for open_clip's CLIP text transformer (inline or TextTransformer)."""

    def __init__(self, model):
        text = getattr(model, "text", None)
        if text is not None and not isinstance(text, TextTransformer):
            raise ValueError(f"the text tower is {type(text).__name__}; NEARL-CLIP steps only open_clip's own "
                             "text transformer block by block (Hugging Face text towers are not supported)")
        if text is not None:
            if text.cls_emb is not None:
                raise ValueError("the text tower appends a class token (CoCa-style embed_cls); not supported")
            self.src, self.pool_type, self.eos_id = text, text.pool_type, getattr(text, "eos_id", None)
        elif hasattr(model, "token_embedding") and hasattr(model, "transformer"):
            self.src, self.pool_type, self.eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
        else:
            raise ValueError(f"{type(model).__name__} has no open_clip text transformer to step through")
        self.transformer = self.src.transformer
        self.blocks = list(self.transformer.resblocks)
        self.width = self.transformer.width

    def stem(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(self.src, TextTransformer):
            return self.src._embeds(tokens)
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.src.token_embedding(tokens).to(cast_dtype)
        return x + self.src.positional_embedding.to(cast_dtype), self.src.attn_mask

    def block(self, k: int, x: torch.Tensor, attn_mask) -> torch.Tensor:
        return _run_block(self.blocks[k], x, self.transformer, attn_mask)

    def head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.src.ln_final(x)
        pooled = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.src.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj

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
