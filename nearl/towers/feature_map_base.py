"""What the convolutional and hierarchical image towers share (open_clip's ModifiedResNet, timm's
ConvNeXt, Swin and FastViT): a feature map that narrows in space and widens in channels stage by
stage, where a NEARL layer needs one token width d for the tower's one query bank.

So the stepped blocks are the LAST stage's blocks of one width; everything before them is the stem
(the earlier stages and the last stage's entry: its downsampling, or the first block when that is
the one changing width and resolution), and the tower's own head follows them. The last stage has
the most semantic features and the fewest tokens (7 x 7 at 224 pixels), so adapting it is cheap.

Between blocks the map is tokens (B, H*W, C), rows first, C the block's channels. The stem's second
value, which the protocol hands back to every block as its mask, is the map's size (H, W); each
block runs on the map restored in its own layout (NCHW, or NHWC for timm's Swin) and in the memory
format the backbone's forward hands that block (`entry_format`, `between_format`), so that its
convolutions are the ones the backbone runs, bit for bit, whatever strides a NEARL layer returns.
Convolutional blocks are no pre-norm attention + MLP pair, so ALTA refuses them (timm_swin.py splits
Swin's, which are)."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from nearl.towers.base import PreNormParts, Tower

Size = Tuple[int, int]


class FeatureMapTower(Tower):
    kind = "vision"
    channels_last = False  # the blocks' layout: NCHW, or NHWC (timm's Swin)
    # The memory formats in which the backbone's forward hands its maps to the first stepped block and
    # to the later ones (and the head): a convolution's kernel, and so its bits, can depend on it.
    entry_format = torch.contiguous_format
    between_format = torch.contiguous_format
    _blocks: List[torch.nn.Module]
    _width: int

    # ----------------------------------------------------------------- what a subclass gives
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the map the first stepped block takes, in the blocks' layout."""
        raise NotImplementedError

    def finish(self, fmap: torch.Tensor) -> torch.Tensor:
        """The last block's map -> the pooled feature `project` takes (the backbone's own head)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the protocol
    @property
    def width(self) -> int:
        return self._width

    @property
    def blocks(self) -> List[torch.nn.Module]:
        return self._blocks

    def to_tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """Contiguous (B, H*W, C) tokens: the NEARL layer's kernels read whole rows (a copy of an NCHW
        map; a view of a channels-last or NHWC one)."""
        return (fmap.flatten(1, 2) if self.channels_last else fmap.flatten(2).transpose(1, 2)).contiguous()

    def to_map(self, x: torch.Tensor, size: Size, memory_format: torch.memory_format) -> torch.Tensor:
        """Tokens -> the map in the blocks' layout and in `memory_format` (a view when it is already)."""
        (h, w), (b, _, c) = size, x.shape
        fmap = x.reshape(b, h, w, c) if self.channels_last else x.transpose(1, 2).reshape(b, c, h, w)
        return fmap.contiguous(memory_format=memory_format)

    def stem(self, images: torch.Tensor) -> Tuple[torch.Tensor, Size]:
        fmap = self.features(images)
        size = fmap.shape[1:3] if self.channels_last else fmap.shape[2:]
        return self.to_tokens(fmap), (int(size[0]), int(size[1]))

    def block(self, k: int, x: torch.Tensor, attn_mask: Optional[Size] = None) -> torch.Tensor:
        fmap = self.to_map(x, attn_mask, self.entry_format if k == 0 else self.between_format)  # the stem's (H, W)
        return self.to_tokens(self._blocks[k](fmap))

    def prenorm_parts(self, k: int) -> PreNormParts:
        raise ValueError(f"the {self.kind} tower ({self.type_name}) cannot split its blocks into branches: they are "
                         "convolutional residual blocks, not a pre-norm attention + MLP pair")

    def grid(self, n: int, images: Optional[torch.Tensor]) -> Size:
        """(H, W) of n tokens: the pooling is not handed the stem's size, so it follows from the images'
        aspect ratio (the tower's image size without images), as the stages keep it."""
        img_h, img_w = images.shape[-2:] if images is not None else self.image_size
        h = max(1, round(math.sqrt(n * img_h / img_w)))
        if n % h:
            raise ValueError(f"{n} tokens are no grid of the aspect ratio of {img_h} x {img_w} images")
        return h, n // h

    def pool(self, x: torch.Tensor, images: Optional[torch.Tensor] = None) -> torch.Tensor:
        fmt = self.between_format if self.depth else self.entry_format
        return self.finish(self.to_map(x, self.grid(x.shape[1], images), fmt))
