"""The tower protocol: everything a method, the model, training or a benchmark may ask of a tower.

A tower is stepped as stem -> blocks -> pooling -> projection, with the tokens batch-first
(B, N, width) between blocks whatever the backbone's own layout. One module per tower type
implements it (`open_clip_vision.py`, `open_clip_text.py`, ...); `nearl.towers.towers_of` picks them.
Nothing outside those modules reads a backbone's tower internals.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn


class PreNormParts(NamedTuple):
    """A pre-norm residual block split at its two branches, for methods that add their own
    (ALTA): x = x + attention(x, attn_mask); h = norm2(x); x = x + mlp(h)."""
    attention: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]


def visual_found(backbone: nn.Module) -> str:
    """What an image tower type's `found` says of `backbone.visual` when it is not its own."""
    visual = getattr(backbone, "visual", None)
    return f"an image tower of type {type(visual).__name__}" if visual is not None else "no `visual` image tower"


class Tower:
    """One tower of a CLIP-style backbone. `kind` is "vision" or "text"."""

    kind: str = "?"
    type_name: str = "?"  # what the factory's messages call this tower type
    takes_context: bool = False  # text towers: `context_stem` can place learned context tokens (CoOp)
    context_at: int = 1  # where learned context goes: after the start token ([CLS], <start_of_text>)

    def __init__(self, backbone: nn.Module):
        if not self.accepts(backbone):
            raise ValueError(f"{self.type_name} expected, found {self.found(backbone)}")

    @classmethod
    def accepts(cls, backbone: nn.Module) -> bool:
        """True when this type can step `backbone`'s tower of its kind."""
        raise NotImplementedError

    @classmethod
    def found(cls, backbone: nn.Module) -> str:
        """What `backbone` holds where this type looks, for the factory's error."""
        raise NotImplementedError

    # ----------------------------------------------------------------- sizes
    @property
    def width(self) -> int:
        """Token width d between blocks."""
        raise NotImplementedError

    @property
    def blocks(self) -> List[nn.Module]:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ----------------------------------------------------------------- stepping
    def stem(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images or token ids -> (tokens (B, N, width), the blocks' attention mask or None). Callers
        hand that second value back to `block` / `prenorm_parts` as it is: a tower whose blocks take
        something else beside the tokens gives that instead (timm Eva: its rotary embedding)."""
        raise NotImplementedError

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Block k on batch-first tokens."""
        raise NotImplementedError

    def prenorm_parts(self, k: int) -> PreNormParts:
        """Block k split at its branches; a ValueError for a block that is not pre-norm residual."""
        raise ValueError(f"the {self.kind} tower ({self.type_name}) cannot split its blocks into branches")

    def check_adapted_blocks(self) -> None:
        """A ValueError when `adapted_block` cannot run this tower's blocks."""
        for k in range(self.depth):
            self.prenorm_parts(k)

    def adapted_block(self, k: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      after_attention: Callable[[torch.Tensor], torch.Tensor],
                      beside_mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Block k with two additions (ALTA's adapters): `after_attention` maps the residual stream
        once attention is added to it, and `beside_mlp(h)` is added to the MLP's output, h being the
        MLP's input. With after_attention = identity and beside_mlp = 0 it is the block. Pre-norm:
        x = after_attention(x + attn(x)); h = norm2(x); x + mlp(h) + beside_mlp(h)."""
        parts = self.prenorm_parts(k)
        x = after_attention(x + parts.attention(x, attn_mask))
        h = parts.norm2(x)
        return x + parts.mlp(h) + beside_mlp(h)

    def pool(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Final tokens -> the pooled (B, width) feature the projection takes."""
        raise NotImplementedError

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled feature -> the tower's output feature (the shared embedding space)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(x, inputs))

    def valid_mask(self, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, N) bool, True at the tokens the head can see; None when every token counts."""
        return None

    def context_stem(self, tokens: torch.Tensor, context: torch.Tensor, at: int = 1
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stem with `context` (n, width) in place of the token embeddings of positions
        at .. at + n - 1 (CoOp's learned context; towers with `takes_context` only)."""
        raise ValueError(f"the {self.kind} tower ({self.type_name}) cannot take learned context tokens (coop)")

    def word_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, width): the tokens' own embeddings, what `context_stem` replaces (BiomedCoOp starts
        its context from a phrase's; towers with `takes_context` only)."""
        raise ValueError(f"the {self.kind} tower ({self.type_name}) cannot take learned context tokens (coop)")

    def output_dim(self) -> int:
        """Width of the tower's output features. Vision towers: found by running one zero image
        through stem, blocks and head; a tower that knows it without that says so itself."""
        if self.kind != "vision":
            raise NotImplementedError
        dev = next(self.blocks[0].parameters()).device
        with torch.no_grad():
            x, attn_mask = self.stem(torch.zeros(1, 3, *self.image_size, device=dev))
            for k in range(self.depth):
                x = self.block(k, x, attn_mask)
            return int(self.head(x, None).shape[-1])

    # ----------------------------------------------------------------- parameters
    def projection_parameters(self) -> List[nn.Parameter]:
        """The final projection's parameters (ALTA trains them)."""
        raise NotImplementedError
