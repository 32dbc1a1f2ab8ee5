"""NEARL-Tiny-BiomedCLIP: BiomedCLIP's architecture at a CPU size, offline. The image tower is
open_clip's TimmModel around a timm ViT (tests/tiny_timm.py), the text tower open_clip's
HFTextEncoder around a 2-layer BERT with a WordPiece vocabulary written here, BiomedCLIP's
class-token pooler and MLP projection, a 32-token context with padding. `register(folder)` writes
the BERT folder and the open_clip config there and makes the model known in this process."""
import json
from pathlib import Path

import open_clip

import tiny_timm

NAME = "NEARL-Tiny-BiomedCLIP"
WORDS = ("a the of with and in on left right small large chest x ray ct mr axial abdomen fundus photograph lung "
         "heart effusion normal image brain liver kidney bone").split()
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz0123456789")
         + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(".,-:;()/'"))


def write_bert_config(folder: Path, **sizes) -> None:
    """A BERT config.json (dropout 0.1 as in BERT; the backbone runs in eval mode)."""
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "type_vocab_size": 2, "pad_token_id": 0,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, **sizes}))


def write_bert(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    write_bert_config(folder, vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=96, max_position_embeddings=32)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32}))
    return folder


def add_config(folder: Path, name: str, config: dict) -> str:
    """Write `name`'s open_clip model config under folder/model_configs and make it known to open_clip."""
    configs = Path(folder) / "model_configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(configs)
    return name


# the tiny timm ViT (tests/tiny_timm.py) as an open_clip TimmModel with class-token pooling, as BiomedCLIP's
TINY_VISION = {"timm_model_name": "nearl_tiny_vit", "timm_model_pretrained": False, "timm_pool": "token",
               "timm_proj": "linear", "image_size": 32}


def hf_text_cfg(model_dir: Path, pooler: str, context_length: int) -> dict:
    """open_clip's text_cfg for an HFTextEncoder around the model (and tokenizer) in `model_dir`."""
    return {"hf_model_name": str(model_dir), "hf_tokenizer_name": str(model_dir), "hf_proj_type": "mlp",
            "hf_pooler_type": pooler, "context_length": context_length}


def register(folder: Path) -> str:
    tiny_timm.register()
    bert = write_bert(Path(folder) / "bert")
    return add_config(folder, NAME, {"embed_dim": 32, "custom_text": True, "vision_cfg": TINY_VISION,
                                     "text_cfg": hf_text_cfg(bert, "cls_last_hidden_state_pooler", 32)})


FULL = "BiomedCLIP-architecture"


def register_full(folder: Path) -> str:
    """BiomedCLIP at full size (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip
    config: timm vit_base_patch16_224 with class-token pooling and a linear head to 512, PubMedBERT
    base (768 wide, 12 layers, vocabulary 30522) with the [CLS] pooler and an MLP projection, a
    256-token context), random weights, offline: a local BERT config, no vocabulary."""
    bert = Path(folder) / "pubmedbert"
    bert.mkdir(parents=True, exist_ok=True)
    write_bert_config(bert, vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512)
    return add_config(folder, FULL, {
        "embed_dim": 512, "custom_text": True,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": hf_text_cfg(bert, "cls_last_hidden_state_pooler", 256)})
