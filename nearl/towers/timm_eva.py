"""open_clip's TimmModel around a timm Eva (EVA01, EVA02 and PE-Core image towers: rotary position
embeddings, SwiGLU, layer scale, attention pooling), stepped as timm's Eva.forward_features and
forward_head and open_clip's head run it: patch embedding, `_pos_embed` (which also gives the
rotary embedding and applies patch dropout), `norm_pre`, the blocks, each given the rotary
embedding, then the pooling and projection of timm_base.py.

The stem's second value, handed back to every block as the protocol's attention mask, is that
rotary embedding (None without RoPE): the blocks take no other mask."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nearl.towers.base import PreNormParts
from nearl.towers.timm_base import TimmTrunkTower

try:  # timm comes with open_clip; without it there is simply no tower of this type
    from timm.models.eva import Eva, EvaBlock
except ImportError:  # pragma: no cover
    Eva = EvaBlock = None


class TimmEva(TimmTrunkTower):
    type_name = "open_clip TimmModel around a timm Eva (EVA, EVA02, PE)"
    trunk_class = Eva

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        t = self.trunk
        x, rope = t._pos_embed(t.patch_embed(images))
        return t.norm_pre(x), rope

    def _rope(self, k: int, rope: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # mixed RoPE learns one embedding per block, stacked on the first axis (as forward_features indexes it)
        return rope[k] if rope is not None and getattr(self.trunk, "rope_mixed", False) else rope

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._blocks[k](x, rope=self._rope(k, attn_mask))  # attn_mask: the stem's rotary embedding

    def prenorm_parts(self, k: int) -> PreNormParts:
        blk = self._blocks[k]
        if type(blk) is not EvaBlock:  # EvaBlockPostNorm normalises the branches' outputs
            raise ValueError(f"the vision tower has timm {type(blk).__name__} blocks; only timm's EvaBlock can be "
                             "split at its branches")

        def attention(x, rope=None):
            a = blk.attn(blk.norm1(x), rope=self._rope(k, rope))
            return blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a)

        def mlp(h):
            m = blk.mlp(h)
            return blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)

        return PreNormParts(attention, blk.norm2, mlp)
