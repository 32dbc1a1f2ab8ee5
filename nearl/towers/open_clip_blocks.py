"""What open_clip's two tower types share: running a ResidualAttentionBlock on batch-first tokens
whatever the stack's layout, and splitting one at its branches."""
from __future__ import annotations

from typing import Optional

import torch
from open_clip.transformer import ResidualAttentionBlock

from nearl.towers.base import PreNormParts


def run_block(block, x: torch.Tensor, batch_first: bool, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    # Our loop keeps x batch-first (B, N, d); a sequence-first stack gets it transposed per block.
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def prenorm_parts(block, batch_first: bool, kind: str) -> PreNormParts:
    """open_clip's ResidualAttentionBlock.forward (self-attention) at its branches; batch-first."""
    if type(block) is not ResidualAttentionBlock:
        raise ValueError(f"the {kind} tower has {type(block).__name__} blocks; only open_clip's "
                         "ResidualAttentionBlock can be split at its branches")

    def attention(x, attn_mask=None):
        h = block.ln_1(x)
        if not batch_first:
            return block.ls_1(block.attention(q_x=h.transpose(0, 1), attn_mask=attn_mask)).transpose(0, 1)
        return block.ls_1(block.attention(q_x=h, attn_mask=attn_mask))

    return PreNormParts(attention, block.ln_2, lambda h: block.ls_2(block.mlp(h)))
