"""Hugging Face transformers CLIP-family checkpoints as frozen backbones (PLIP and the PubMedCLIP
ports are CLIPModels, MedSigLIP a SiglipModel; MODEL_TYPES lists the rest): `nearl.build("transformers:<repo
id or folder>")`. REFUSED names the types that cannot be stepped, and why.

`TransformersCLIP` gives such a model the face the rest of NEARL-CLIP uses (encode_image,
encode_text, logit_scale, logit_bias, make_tokenizer, the preprocessing); its towers are stepped by
nearl/towers/hf_clip_vision.py and hf_clip_text.py. Text goes in as the tokenizer pads it (to the
text tower's context length) with no attention mask: CLIP's text tower is causal, so padding after
the end-of-text token changes nothing it pools, and SigLIP's was trained on padded text without one.
The BERT / XLM-RoBERTa text towers (ChineseCLIP, AltCLIP, BLIP; hf_bert_text.py) get the padding mask
their tokenizers give. SigLIP 2's NaFlex image tower takes images as rows of patches with a patch mask
and the patch grid's shape: NEARL-CLIP feeds it square images of its full patch count (what its image
processor makes of a square image), so the mask is all ones (`naflex_inputs`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nearl.towers import downloads
from nearl.towers.sources import TRANSFORMERS as SCHEMA  # the prefix, to name a source in messages
from nearl.errors import UserError

MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel", "metaclip_2": "MetaClip2Model", "owlvit": "OwlViTModel",
               "owlv2": "Owlv2Model", "chinese_clip": "ChineseCLIPModel", "altclip": "AltCLIPModel",
               "siglip2": "Siglip2Model", "blip": "BlipModel"}
SIGLIP_TYPES = ("siglip", "siglip2")  # a sigmoid loss with a learned bias; SigLIP's preprocessing defaults
BERT_TEXT_TYPES = ("chinese_clip", "altclip", "blip")  # a BERT-style text tower under a padding mask
REFUSED = {
    "align": "ALIGN's image tower is an EfficientNet: convolutional stages over a shrinking feature map, "
             "not a sequence of residual blocks over a fixed token set",
    "groupvit": "GroupViT's image tower is stages of grouping blocks that merge its tokens into fewer group "
                "tokens: not a sequence of residual blocks over a fixed token set",
}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them
_OPENAI_MEAN, _OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class TransformersCLIP(nn.Module):
    """A frozen transformers model of MODEL_TYPES (`hf`), from `source` (a repo id or a folder)."""

    def __init__(self, hf: nn.Module, source: str, preprocess_cfg: dict):
        super().__init__()
        self.hf = hf
        self.source = source
        self.preprocess_cfg = preprocess_cfg

    @property
    def model_type(self) -> str:
        return self.hf.config.model_type

    @property
    def is_siglip(self) -> bool:
        return self.model_type in SIGLIP_TYPES

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf.logit_scale.reshape(())  # SigLIP keeps it as a (1,) tensor

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        return self.hf.logit_bias.reshape(()) if self.is_siglip else None

    @property
    def context_length(self) -> int:
        text = self.hf.config.text_config
        n = int(text.max_position_embeddings)  # XLM-RoBERTa counts positions from its pad id + 1
        return n - int(text.pad_token_id) - 1 if self.model_type == "altclip" else n

    def image_inputs(self, images: torch.Tensor) -> dict:
        """The image tower's keyword arguments for a batch of (B, 3, H, W) images."""
        if self.model_type == "siglip2":
            return naflex_inputs(images, int(self.hf.config.vision_config.patch_size))
        return {"pixel_values": images}

    def text_mask(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """The padding mask BERT-style text towers take (1 at tokens that are not padding), else None."""
        if self.model_type not in BERT_TEXT_TYPES:
            return None
        return (tokens != self.hf.config.text_config.pad_token_id).long()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return _features(self.hf.get_image_features(**self.image_inputs(images)), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        mask = self.text_mask(tokens)
        if self.model_type == "chinese_clip":  # its forward's pooling: transformers 4.x's get_text_features
            out = self.hf.text_model(input_ids=tokens, attention_mask=mask)  # reads a pooler the model lacks
            return _features(self.hf.text_projection(out.last_hidden_state[:, 0, :]), normalize)
        return _features(self.hf.get_text_features(input_ids=tokens, attention_mask=mask), normalize)

    def make_tokenizer(self):
        """open_clip's wrapper of the checkpoint's own tokenizer, padding to the context length."""
        from open_clip.tokenizer import HFTokenizer
        return HFTokenizer(self.source, context_length=self.context_length)


def naflex_inputs(images: torch.Tensor, patch: int) -> dict:
    """SigLIP 2's NaFlex inputs for (B, C, H, W) images: rows of patches laid out as its image processor
    lays them (each patch row by row, channels last), an all-ones patch mask and the patch grid's shape."""
    b, c, h, w = images.shape
    rows, cols = h // patch, w // patch
    patches = images.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, -1)
    return {"pixel_values": patches, "pixel_attention_mask": patch_mask(patches),
            "spatial_shapes": torch.tensor([[rows, cols]] * b, device=images.device)}


def patch_mask(tokens: torch.Tensor) -> torch.Tensor:
    """SigLIP 2's patch mask for (B, N, ...) patches or tokens, all of them real."""
    return torch.ones(tokens.shape[:2], dtype=torch.int32, device=tokens.device)


def image_size(vision_config) -> int:
    """The square image side the image tower takes: its image_size, or (SigLIP 2) its patch count's."""
    if hasattr(vision_config, "num_patches") and not hasattr(vision_config, "image_size"):
        return math.isqrt(int(vision_config.num_patches)) * int(vision_config.patch_size)
    return int(vision_config.image_size)


def _features(out, normalize: bool) -> torch.Tensor:
    features = out if isinstance(out, torch.Tensor) else out.pooler_output  # 5.x returns the model output
    return F.normalize(features, dim=-1) if normalize else features


def create(source: str, weights: bool) -> TransformersCLIP:
    """The backbone in `source` (a Hugging Face repo id or a local folder): its weights when
    `weights`, else random weights from its config alone (offline when `source` is a folder)."""
    from transformers import AutoConfig, AutoModel

    source = os.path.expanduser(source)
    if source.startswith(("/", ".")) and not os.path.isdir(source):
        raise UserError(f"{SCHEMA}{source}: no such folder")
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        # transformers 4.x would guess a model type from the folder's name instead
        raise UserError(f"{SCHEMA}{source}: no transformers config found (no config.json in the folder)")
    downloads.check_reachable(SCHEMA + source, None)  # a repo id not in the cache, and no network: said at once
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if downloads.unreachable(err):
            raise downloads.offline_error(SCHEMA + source, None, str(err).splitlines()[0]) from None
        raise UserError(f"{SCHEMA}{source}: no transformers config found ({err})") from None
    check_model_type(source, config)
    if weights:
        if os.path.isdir(source) and not any(any(Path(source).glob(p)) for p in ("*.safetensors", "*.bin")):
            raise UserError(f"{SCHEMA}{source} has a config but no weights (*.safetensors or *.bin); "
                             f"for random weights, name it as the model with no pretrained source")
        model = AutoModel.from_pretrained(source)
    else:
        model = AutoModel.from_config(config)
    return TransformersCLIP(model.float().eval(), source, preprocess_cfg(config, _processor_config(source)))


def check_model_type(source: str, config) -> None:
    """A UserError for a model type NEARL-CLIP does not adapt: its reason when REFUSED names one."""
    if config.model_type in MODEL_TYPES:
        return
    reason = f": {REFUSED[config.model_type]}" if config.model_type in REFUSED else ""
    names = ", ".join(MODEL_TYPES.values())
    raise UserError(f"{SCHEMA}{source} is a {config.model_type!r} model{reason}. NEARL-CLIP adapts transformers "
                     f"{names} checkpoints (model types {sorted(MODEL_TYPES)})")


def _processor_config(source: str) -> dict:
    """The checkpoint's preprocessor_config.json, or {} when it has none."""
    if os.path.isdir(source):
        path = Path(source) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
    except EntryNotFoundError:
        return {}


def preprocess_cfg(config, processor: dict) -> dict:
    """open_clip's PreprocessCfg fields for the checkpoint's image processor. Without one: CLIP's
    (bicubic, shortest side then centre crop, OpenAI's statistics) or SigLIP's (bilinear, squashed to
    the square, mean = std = 0.5) defaults."""
    siglip = config.model_type in SIGLIP_TYPES
    size = processor.get("size") or {}
    crops = processor.get("do_center_crop", not siglip)
    return {
        "size": image_size(config.vision_config),
        "mode": "RGB",
        "mean": tuple(processor.get("image_mean", (0.5,) * 3 if siglip else _OPENAI_MEAN)),
        "std": tuple(processor.get("image_std", (0.5,) * 3 if siglip else _OPENAI_STD)),
        "interpolation": _RESAMPLE.get(processor.get("resample", 2 if siglip else 3), "bicubic"),
        "resize_mode": "shortest" if crops or "shortest_edge" in size else "squash",
    }
