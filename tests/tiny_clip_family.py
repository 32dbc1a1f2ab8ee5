"""Tiny Hugging Face transformers checkpoints of the CLIP family beyond CLIPModel / SiglipModel
(MetaCLIP 2, OWL-ViT, OWLv2, ChineseCLIP, AltCLIP, SigLIP 2, BLIP), offline: a config and a WordPiece
tokenizer written to a folder, no weights; and configs of the refused types (ALIGN, GroupViT)."""
from pathlib import Path

import transformers

from tiny_transformers import TOWER, VOCAB, write_wordpiece

KINDS = ("metaclip_2", "owlvit", "owlv2", "chinese_clip", "altclip", "siglip2", "blip")
REFUSED = ("align", "groupvit")
CONTEXT = 16
CONFIGS = {"metaclip_2": "MetaClip2Config", "owlvit": "OwlViTConfig", "owlv2": "Owlv2Config",
           "chinese_clip": "ChineseCLIPConfig", "altclip": "AltCLIPConfig", "siglip2": "Siglip2Config",
           "blip": "BlipConfig", "align": "AlignConfig", "groupvit": "GroupViTConfig"}


def vocab(kind: str) -> list:
    """OWL-ViT / OWLv2 pool at the highest id: their end token comes last. XLM-RoBERTa (AltCLIP) pads
    with id 1 and counts positions from it."""
    if kind in ("owlvit", "owlv2"):
        return [w for w in VOCAB if w != "<end>"] + ["<end>"]
    if kind == "altclip":
        return ["<start>", "<pad>", "<end>", "<unk>"] + VOCAB[4:]
    return list(VOCAB)


def specials(kind: str) -> dict:
    """The text config's special ids, as the tokenizer of `kind` has them."""
    words = vocab(kind)
    return {"pad_token_id": words.index("<pad>"), "bos_token_id": words.index("<start>"),
            "eos_token_id": words.index("<end>")}


def config(kind: str):
    """The tiny transformers config of `kind`: 2 layers 32 wide, 32 x 32 images in 8 x 8 patches."""
    extra = {"altclip": {"project_dim": 32}, "blip": {"encoder_hidden_size": 32}}.get(kind, {})
    positions = CONTEXT + specials(kind)["pad_token_id"] + 1 if kind == "altclip" else CONTEXT
    text = dict(TOWER, vocab_size=len(vocab(kind)), max_position_embeddings=positions, **specials(kind), **extra)
    vision = dict(TOWER, patch_size=8, **({"num_patches": 16} if kind == "siglip2" else {"image_size": 32}))
    if kind == "blip":  # its default (1e-10) leaves every image token alike: no gradient reaches the keys
        vision["initializer_range"] = 0.02
    if kind == "align":
        vision = {"image_size": 32, "hidden_dim": 64, "depth_coefficient": 0.1, "width_coefficient": 0.1}
    if kind == "groupvit":
        vision = dict(hidden_size=32, intermediate_size=64, depths=[1, 1], num_hidden_layers=2, num_group_tokens=[4, 0],
                      num_output_groups=[4, 4], num_attention_heads=2, image_size=32, patch_size=8)
    projection = {} if kind == "siglip2" else {"projection_dim": 24}
    return getattr(transformers, CONFIGS[kind])(text_config=text, vision_config=vision, **projection)


def write(folder: Path, kind: str) -> str:
    """A tiny checkpoint folder of `kind` (no weights); returns its 'transformers:' name."""
    folder.mkdir(parents=True, exist_ok=True)
    config(kind).save_pretrained(folder)
    template = "$A <end>" if kind == "siglip2" else "<start> $A <end>"  # SigLIP's tokenizer only ends the text
    write_wordpiece(folder, vocab(kind), template, CONTEXT, unk_token="<unk>", pad_token="<pad>",
                    bos_token="<start>", eos_token="<end>")
    return "transformers:" + str(folder)
