"""Tiny Hugging Face transformers CLIPModel and SiglipModel checkpoints, offline: a config (and,
for CLIP, an image processor config) and a WordPiece tokenizer written to a folder, no weights.
`nearl.build("transformers:" + folder)` builds them with random weights; `save_weights` adds
weights for the loading path that reads them."""
import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, PreTrainedTokenizerFast, SiglipConfig

from tiny_biomed import WORDS

SPECIALS = ["<pad>", "<unk>", "<start>", "<end>"]  # ids 0..3: the end token is not 2 (transformers' legacy rule)
VOCAB = list(dict.fromkeys(SPECIALS + list(WORDS) + list("abcdefghijklmnopqrstuvwxyz0123456789")
                           + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(".,-:;()/'")))
CONTEXT = {"clip": 24, "siglip": 16}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def write_tokenizer(folder: Path, model_type: str) -> None:
    """CLIP's tokenizer frames the text as <start> ... <end>; SigLIP's only ends it."""
    template = "<start> $A <end>" if model_type == "clip" else "$A <end>"
    write_wordpiece(folder, VOCAB, template, CONTEXT[model_type], unk_token="<unk>", pad_token="<pad>",
                    bos_token="<start>", eos_token="<end>")


def write_wordpiece(folder: Path, vocab, template: str, max_length: int, **special) -> None:
    """A fast WordPiece tokenizer (lower case) that frames text by `template`, saved as transformers does."""
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token=special["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    framing = [special[k] for k in ("bos_token", "eos_token") if k in special]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, ids[t]) for t in framing])
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special).save_pretrained(folder)


def write(folder: Path, model_type: str) -> str:
    """A tiny CLIPModel ("clip") or SiglipModel ("siglip") folder; returns its 'transformers:' name."""
    folder.mkdir(parents=True, exist_ok=True)
    text = dict(TOWER, vocab_size=len(VOCAB), max_position_embeddings=CONTEXT[model_type], pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    vision = dict(TOWER, image_size=32, patch_size=8)
    if model_type == "clip":
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        (folder / "preprocessor_config.json").write_text(json.dumps({  # as CLIPImageProcessor writes it
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
            "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "resample": 3,
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    else:
        config = SiglipConfig(text_config=text, vision_config=vision)  # features 32 wide, as the image tower
    config.save_pretrained(folder)
    write_tokenizer(folder, model_type)
    return "transformers:" + str(folder)


def save_weights(model, folder: Path) -> None:
    """The transformers model's weights (safetensors) beside its config."""
    model.save_pretrained(folder)
