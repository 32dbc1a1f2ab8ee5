"""open_clip configurations shrunk to a CPU size, offline: any of them (tests/towers/test_all_configs.py),
the timm Eva (EVA01, EVA02, PE-Core), VisionTransformerRelPos and CoCa ones in particular. Each keeps its
open_clip config (pooling, projection, text tower options, CoCa's class token) and its timm
architecture's flags (RoPE, SwiGLU, layer scale, attention pooling), with 2 blocks (a staged trunk's last
stage: 3), small widths, small images and 16 text tokens; a Hugging Face text tower becomes a tiny local
one of its architecture (tests/tiny_hf_text.py). `register(folder, name)` makes "tiny-<name>" known to
open_clip and timm in this process."""
import copy
import json
from pathlib import Path
from typing import Optional

import open_clip
import timm
from timm.models import register_model
from timm.models.vision_transformer_hybrid import ConvStem, _create_vision_transformer_hybrid
from timm.models.vitamin import VitCfg, VitConvCfg
from torch import nn

import tiny_hf_text

# timm's own sizes replaced; every other argument of the entry point stays as timm defines it
TIMM_SIZES = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TEXT_SIZES = dict(width=32, heads=2, layers=2, context_length=16)
VISION_SIZES = dict(image_size=32, patch_size=8, width=64, head_width=32, layers=2)  # open_clip ViTs (CoCa)
# convolutional and hierarchical trunks (nearl/towers/feature_map_base.py), by timm name prefix: their
# own size arguments and image side, the last stage's 3 blocks on a 3 x 3 map (Swin: 6 x 6, so that
# its windows shift); open_clip's ModifiedResNet likewise
STAGED_SIZES = {
    "convnext": (dict(depths=(1, 1, 1, 3), dims=(16, 16, 32, 40)), 96),  # d = 40: no multiple of 16
    "swin": (dict(img_size=96, embed_dim=16, depths=(1, 1, 3), num_heads=(1, 2, 2), window_size=3), 96),
    "fastvit_mci3": (dict(layers=(1, 1, 1, 1, 3), embed_dims=(16, 32, 32, 64, 64)), 160),
    "fastvit_mci4": (dict(layers=(1, 1, 1, 1, 3), embed_dims=(16, 32, 32, 64, 64)), 160),
    "fastvit": (dict(layers=(1, 1, 1, 3), embed_dims=(16, 32, 64, 64)), 96),
}
RESNET_SIZES = dict(image_size=96, layers=[1, 1, 1, 3], width=4)
# ViTamin: a ViT after a convolutional (MbConv) stem, both shrunk; its flags are every variant's
VITAMIN_SIZES = dict(img_size=32, embed_dim=64, depth=2, num_heads=2, embed_cfg=VitCfg(
    embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16,
    conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d"))


def timm_sizes(timm_name: str):
    """(timm size arguments, image side) for `timm_name`: STAGED_SIZES' first prefix, else a ViT's."""
    return next((v for k, v in {**STAGED_SIZES, "vitamin": (VITAMIN_SIZES, 32)}.items() if timm_name.startswith(k)),
                (TIMM_SIZES, 32))


def tiny_vit_base_mci(**kwargs):
    """MobileCLIP-B's image trunk (timm vit_base_mci_224): a ViT on a convolutional stem whose last
    width is the ViT's (no projection between), at 64 wide; built as timm's entry point builds it."""
    stem = ConvStem(channels=(16, 16, 64), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0, in_chans=3,
                    act_layer=nn.GELU)
    return _create_vision_transformer_hybrid("vit_base_mci_224", backbone=stem, embed_args=dict(proj=False),
                                             **{**kwargs, **TIMM_SIZES, "patch_size": 1, "no_embed_class": True})


TIMM_BUILDERS = {"vit_base_mci_224": tiny_vit_base_mci}  # trunks whose sizes are not the entry point's arguments


def tiny_timm_name(timm_name: str) -> str:
    return f"nearl_tiny_{timm_name}"


def register_timm(timm_name: str) -> str:
    """Register timm's `timm_name` at its timm_sizes under tiny_timm_name(timm_name)."""
    name = tiny_timm_name(timm_name)
    if timm.is_model(name):
        return name

    def entry(pretrained=False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # what timm.create_model passes on
            kwargs.pop(key, None)
        if timm_name in TIMM_BUILDERS:
            return TIMM_BUILDERS[timm_name](**kwargs)
        return timm.create_model(timm_name, pretrained=False, **{**kwargs, **timm_sizes(timm_name)[0]})

    entry.__name__ = entry.__qualname__ = name  # timm registers an entry point under its function's name
    register_model(entry)
    return name


def shrunk_config(name: str, timm_name: Optional[str] = None, hf_folder: Optional[Path] = None) -> dict:
    """open_clip's config of `name` at a CPU size; `timm_name` replaces its timm image trunk. A
    Hugging Face text tower (hf_model_name) becomes a tiny one of its architecture written under
    `hf_folder` (tests/tiny_hf_text.py)."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["embed_dim"] = 32
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision:
        timm_name = timm_name or vision["timm_model_name"]
        vision["timm_model_name"] = register_timm(timm_name)
        vision["image_size"] = timm_sizes(timm_name)[1]
        if vision.get("timm_proj") == "none":  # SigLIP: the trunk's own features are the embedding
            cfg["embed_dim"] = timm_sizes(timm_name)[0]["embed_dim"]
    elif isinstance(vision.get("layers"), (list, tuple)):  # open_clip's ModifiedResNet
        vision.update(RESNET_SIZES)
    else:
        vision.update(VISION_SIZES)
        if "attn_pooler_heads" in vision:
            vision["attn_pooler_heads"] = 2
    text = cfg["text_cfg"]
    if "hf_model_name" in text:
        arch = tiny_hf_text.architecture(text["hf_model_name"])
        local = str(tiny_hf_text.write(hf_folder, text["hf_model_name"]))
        text.update(hf_model_name=local, hf_tokenizer_name=local)
        if arch != "mt5":  # T5 has no position table: open_clip's default 77, as released
            text["context_length"] = tiny_hf_text.CONTEXT
        if "width" in text:  # CoCa's decoder reads it: the tiny encoder's
            text["width"] = tiny_hf_text.SIZES["hidden_size"]
    else:
        text.update(TEXT_SIZES)
        if text.get("proj_type") == "none":  # its last layer's width is the embedding
            text["width"] = cfg["embed_dim"]
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
    (configs / f"{tiny}.json").write_text(json.dumps(shrunk_config(name, timm_name, Path(folder) / "hf")))
    open_clip.add_model_config(configs)
    return tiny
