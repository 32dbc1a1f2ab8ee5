"""Hugging Face transformers CLIPModel / SiglipModel checkpoints as frozen backbones (PLIP and the
PubMedCLIP ports are CLIPModels, MedSigLIP a SiglipModel): `nearl.build("transformers:<repo id or
folder>")`.

`TransformersCLIP` gives such a model the face the rest of NEARL-CLIP uses (encode_image,
encode_text, logit_scale, logit_bias, make_tokenizer, the preprocessing); its towers are stepped by
nearl/towers/hf_clip_vision.py and hf_clip_text.py. Text goes in as the tokenizer pads it (to the
text tower's context length) with no attention mask: CLIP's text tower is causal, so padding after
the end-of-text token changes nothing it pools, and SigLIP's was trained on padded text without one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import downloads
from .errors import UserError


SCHEMA = "transformers:"
MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them
_OPENAI_MEAN, _OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class TransformersCLIP(nn.Module):
    """A frozen transformers CLIPModel or SiglipModel (`hf`), from `source` (a repo id or a folder)."""

    def __init__(self, hf: nn.Module, source: str, preprocess_cfg: dict):
        super().__init__()
        self.hf = hf
        self.source = source
        self.preprocess_cfg = preprocess_cfg

    @property
    def is_siglip(self) -> bool:
        return self.hf.config.model_type == "siglip"

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.hf.logit_scale.reshape(())  # SigLIP keeps it as a (1,) tensor

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        return self.hf.logit_bias.reshape(()) if self.is_siglip else None

    @property
    def context_length(self) -> int:
        return int(self.hf.config.text_config.max_position_embeddings)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return _features(self.hf.get_image_features(pixel_values=images), normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return _features(self.hf.get_text_features(input_ids=tokens), normalize)

    def make_tokenizer(self):
        """open_clip's wrapper of the checkpoint's own tokenizer, padding to the context length."""
        from open_clip.tokenizer import HFTokenizer
        return HFTokenizer(self.source, context_length=self.context_length)


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
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"{SCHEMA}{source} is a {config.model_type!r} model; NEARL-CLIP adapts transformers "
                         f"{' and '.join(MODEL_TYPES.values())} checkpoints (model types {sorted(MODEL_TYPES)})")
    if weights:
        if os.path.isdir(source) and not any(any(Path(source).glob(p)) for p in ("*.safetensors", "*.bin")):
            raise UserError(f"{SCHEMA}{source} has a config but no weights (*.safetensors or *.bin); "
                             f"for random weights, name it as the model with no pretrained source")
        model = AutoModel.from_pretrained(source)
    else:
        model = AutoModel.from_config(config)
    return TransformersCLIP(model.float().eval(), source, preprocess_cfg(config, _processor_config(source)))


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
    siglip = config.model_type == "siglip"
    size = processor.get("size") or {}
    crops = processor.get("do_center_crop", not siglip)
    return {
        "size": int(config.vision_config.image_size),
        "mode": "RGB",
        "mean": tuple(processor.get("image_mean", (0.5,) * 3 if siglip else _OPENAI_MEAN)),
        "std": tuple(processor.get("image_std", (0.5,) * 3 if siglip else _OPENAI_STD)),
        "interpolation": _RESAMPLE.get(processor.get("resample", 2 if siglip else 3), "bicubic"),
        "resize_mode": "shortest" if crops or "shortest_edge" in size else "squash",
    }
