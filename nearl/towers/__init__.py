"""One seam for backbones: every method, the model, training and the benchmarks step a tower only
through the protocol in `base.py` (stem, blocks, pooling, projection, width, depth, masks), and
`towers_of` picks the module that implements it for a backbone.

Tower types, one module each: `open_clip_vision.py` (open_clip's VisionTransformer),
`timm_vision.py` (open_clip's TimmModel around a timm VisionTransformer, as in BiomedCLIP),
`timm_eva.py` (around a timm Eva: EVA01, EVA02, PE-Core) and `timm_relpos.py` (around a timm
VisionTransformerRelPos), the three on `timm_base.py`; the convolutional and hierarchical image towers
on `feature_map_base.py` (the last stage's blocks, the feature map as tokens): `open_clip_resnet.py`
(open_clip's ModifiedResNet, RN50...) and, on `timm_stages.py`, `timm_convnext.py`, `timm_swin.py` and
`timm_fastvit.py` (MobileCLIP); `open_clip_text.py` (its CLIP text
transformer, inline or TextTransformer), `open_clip_coca_text.py` (CoCa's, with a class token
appended), `hf_text.py` (its HFTextEncoder around a BERT-style encoder, as in BiomedCLIP), and
`hf_clip_vision.py` / `hf_clip_text.py` (a transformers CLIPModel's or SiglipModel's towers, and the
CLIP-like types', on `hf_clip_base.py`; nearl/towers/transformers_backbone.py builds the backbone) and
`hf_bert_text.py` (the BERT-style text tower of a transformers ChineseCLIP, AltCLIP or BLIP model),
`hf_seq2seq_text.py` (HFTextEncoder around an MT5 / T5 encoder stack or an M2M100 encoder: open_clip's
`mt5-*` and `nllb-clip-*`).
A new type is a new module with a `Tower` subclass, listed in TOWER_TYPES.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from nearl.towers.base import PreNormParts, Tower
from nearl.towers.hf_bert_text import HFBertText
from nearl.towers.hf_clip_text import HFCLIPText
from nearl.towers.hf_clip_vision import HFCLIPVision
from nearl.towers.hf_seq2seq_text import HFM2M100Text, HFT5Text
from nearl.towers.hf_text import HFText
from nearl.towers.open_clip_coca_text import CoCaText
from nearl.towers.open_clip_resnet import OpenClipResNet
from nearl.towers.open_clip_text import OpenClipText
from nearl.towers.open_clip_vision import OpenClipVision
from nearl.towers.timm_convnext import TimmConvNeXt
from nearl.towers.timm_eva import TimmEva
from nearl.towers.timm_fastvit import TimmFastViT
from nearl.towers.timm_relpos import TimmRelPos
from nearl.towers.timm_swin import TimmSwin
from nearl.towers.timm_vision import TimmVision

TOWER_TYPES = {"vision": (OpenClipVision, TimmVision, TimmEva, TimmRelPos, HFCLIPVision, OpenClipResNet, TimmConvNeXt,
                          TimmSwin, TimmFastViT),
               "text": (OpenClipText, CoCaText, HFText, HFT5Text, HFM2M100Text, HFCLIPText, HFBertText)}


def tower_of(backbone: nn.Module, kind: str) -> Tower:
    """The `kind` ("vision" or "text") tower of `backbone`, or a ValueError saying what was found
    and which tower types exist."""
    if kind not in TOWER_TYPES:
        raise ValueError(f"tower kind must be one of {sorted(TOWER_TYPES)}, got {kind!r}")
    for cls in TOWER_TYPES[kind]:
        if cls.accepts(backbone):
            return cls(backbone)
    known = ", ".join(cls.type_name for cls in TOWER_TYPES[kind])
    found = "; ".join(dict.fromkeys(cls.found(backbone) for cls in TOWER_TYPES[kind]))  # each said once
    raise ValueError(f"no supported {kind} tower in {type(backbone).__name__}: found {found}. "
                     f"NEARL-CLIP steps these {kind} tower types block by block: {known}")


def towers_of(backbone: nn.Module) -> Dict[str, Tower]:
    """{"vision": ..., "text": ...} for `backbone`."""
    return {kind: tower_of(backbone, kind) for kind in TOWER_TYPES}


__all__ = ["CoCaText", "HFBertText", "HFCLIPText", "HFCLIPVision", "HFM2M100Text", "HFT5Text", "HFText", "PreNormParts", "TOWER_TYPES", "Tower", "OpenClipText",
           "OpenClipResNet", "OpenClipVision", "TimmConvNeXt", "TimmEva", "TimmFastViT", "TimmRelPos", "TimmSwin",
           "TimmVision", "tower_of", "towers_of"]
