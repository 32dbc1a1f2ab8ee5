"""NEARL-Tiny-timm: NEARL-Tiny's text tower with BiomedCLIP's kind of image tower, open_clip's
TimmModel around a timm VisionTransformer (class-token pooling, a linear head), at a CPU size.
`register()` makes the timm architecture and the open_clip config known in this process, offline."""
from pathlib import Path

import open_clip
import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

NAME = "NEARL-Tiny-timm"


def nearl_tiny_vit(pretrained=False, **kwargs):
    """A 2-block, 64-wide timm ViT on 32 x 32 images (16 patches of 8 and a class token)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # what timm.create_model passes on
        kwargs.pop(key, None)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, **kwargs)
    model.pretrained_cfg = model.default_cfg = {}  # open_clip's TimmModel reads it
    return model


def register() -> str:
    if not timm.is_model("nearl_tiny_vit"):
        register_model(nearl_tiny_vit)  # under the function's name
    open_clip.add_model_config(Path(__file__).parent / "model_configs")
    return NAME
