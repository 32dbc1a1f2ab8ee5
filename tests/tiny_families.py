"""open_clip configurations with timm Eva (EVA01, EVA02, PE-Core) or VisionTransformerRelPos image
towers, and CoCa models, shrunk to a CPU size, offline. Each keeps its open_clip config (pooling,
projection, text tower options, CoCa's class token) and its timm architecture's flags (RoPE, SwiGLU,
layer scale, attention pooling), with 2 blocks, small widths, 32 x 32 images and 16 text tokens.
`register(folder, name)` makes "tiny-<name>" known to open_clip and timm in this process."""
import copy
import json
from pathlib import Path
from typing import Optional

import open_clip
import timm
from timm.models import register_model

# timm's own sizes replaced; every other argument of the entry point stays as timm defines it
TIMM_SIZES = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TEXT_SIZES = dict(width=32, heads=2, layers=2, context_length=16)
VISION_SIZES = dict(image_size=32, patch_size=8, width=64, head_width=32, layers=2)  # open_clip ViTs (CoCa)


def tiny_timm_name(timm_name: str) -> str:
    return f"nearl_tiny_{timm_name}"


def register_timm(timm_name: str) -> str:
    """Register timm's `timm_name` at TIMM_SIZES under tiny_timm_name(timm_name)."""
    name = tiny_timm_name(timm_name)
    if timm.is_model(name):
        return name

    def entry(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # what timm.create_model passes on
            kwargs.pop(key, None)
        return timm.create_model(timm_name, pretrained=False, **{**kwargs, **TIMM_SIZES})

    entry.__name__ = entry.__qualname__ = name  # timm registers an entry point under its function's name
    register_model(entry)
    return name


def shrunk_config(name: str, timm_name: Optional[str] = None) -> dict:
    """open_clip's config of `name` at a CPU size; `timm_name` replaces its timm image trunk."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["embed_dim"] = 32
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision:
        vision["timm_model_name"] = register_timm(timm_name or vision["timm_model_name"])
        vision["image_size"] = 32
    else:
        vision.update(VISION_SIZES)
        if "attn_pooler_heads" in vision:
            vision["attn_pooler_heads"] = 2
    cfg["text_cfg"].update(TEXT_SIZES)
    if "multimodal_cfg" in cfg:  # CoCa's decoder: built, not used by the towers
        cfg["multimodal_cfg"].update(width=32, heads=2, layers=1, attn_pooler_heads=2, context_length=16)
        cfg["multimodal_cfg"].pop("dim_head", None)
    return cfg


def register(folder: Path, name: str, timm_name: Optional[str] = None) -> str:
    """Write "tiny-<name>"'s config ("tiny-<name>-<timm_name>" with that trunk) under
    folder/model_configs and make it known to open_clip."""
    configs = Path(folder) / "model_configs"
    configs.mkdir(parents=True, exist_ok=True)
    tiny = f"tiny-{name}" + (f"-{timm_name}" if timm_name else "")
    (configs / f"{tiny}.json").write_text(json.dumps(shrunk_config(name, timm_name)))
    open_clip.add_model_config(configs)
    return tiny
