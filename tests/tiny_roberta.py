"""NEARL-Tiny-RoBERTa: open_clip's HFTextEncoder around a 2-layer RoBERTa (pad id 1, positions
counted from the padding index, mean pooling, as open_clip's roberta-ViT-B-32) with the tiny timm
image tower, offline. `register(folder)` writes the RoBERTa folder and the open_clip config."""
from pathlib import Path

from transformers import RobertaConfig

import tiny_timm
from tiny_biomed import TINY_VISION, add_config, hf_text_cfg
from tiny_transformers import VOCAB as WORDPIECE, write_wordpiece

NAME = "NEARL-Tiny-RoBERTa"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3
VOCAB = SPECIALS + [w for w in WORDPIECE if not w.startswith("<")]
PAD = 1


def register(folder: Path) -> str:
    tiny_timm.register()
    roberta = Path(folder) / "roberta"
    roberta.mkdir(parents=True, exist_ok=True)
    RobertaConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=96, max_position_embeddings=32 + PAD + 1, pad_token_id=PAD, bos_token_id=0,
                  eos_token_id=2).save_pretrained(roberta)
    write_wordpiece(roberta, VOCAB, "<s> $A </s>", 32, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                    unk_token="<unk>")
    return add_config(folder, NAME, {"embed_dim": 32, "custom_text": True, "vision_cfg": TINY_VISION,
                                     "text_cfg": hf_text_cfg(roberta, "mean_pooler", 32)})
