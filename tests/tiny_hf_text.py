"""Tiny Hugging Face text encoders for open_clip's HFTextEncoder, one per architecture its
configurations name (BERT, RoBERTa, XLM-RoBERTa, MT5, M2M100 for NLLB), offline: a 2-layer,
32-wide config written with save_pretrained and a fast WordPiece tokenizer that frames the text as the
real one does (BERT: [CLS] .. [SEP]; RoBERTa: <s> .. </s>; MT5: .. </s>, no start token; NLLB: its
language code first, then .. </s>), padded to CONTEXT tokens with the model's pad id.
`write(folder, hf_model_name)` writes the one for that name and returns the folder."""
from pathlib import Path

from transformers import BertConfig, M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

from tiny_biomed import WORDS
from tiny_transformers import write_wordpiece

CONTEXT = 16
SIZES = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64)
WORDPIECE = list(dict.fromkeys(list(WORDS) + list("abcdefghijklmnopqrstuvwxyz0123456789")
                               + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(".,-:;()/'")))
# architecture -> (special tokens at ids 0.., tokenizer template, the tokenizer's special-token roles)
SPECIAL = {
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
             dict(pad_token="[PAD]", unk_token="[UNK]", bos_token="[CLS]", eos_token="[SEP]")),
    "roberta": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>",
                dict(bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")),
    "mt5": (["<pad>", "</s>", "<unk>"], "$A </s>", dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")),
    # NLLB puts the source language's code first; here it frames the text as a start token would
    "m2m_100": (["<s>", "<pad>", "</s>", "<unk>", "eng_Latn"], "eng_Latn $A </s>",
                dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="eng_Latn")),
}
SPECIAL["xlm-roberta"] = SPECIAL["roberta"]


def architecture(hf_model_name: str) -> str:
    """The architecture an open_clip config's hf_model_name names ("xlm-roberta-base" -> "xlm-roberta")."""
    name = hf_model_name.lower()
    for key, arch in (("xlm-roberta", "xlm-roberta"), ("roberta", "roberta"), ("mt5", "mt5"), ("nllb", "m2m_100"),
                      ("m2m100", "m2m_100"), ("bert", "bert")):
        if key in name:
            return arch
    raise KeyError(f"no tiny text encoder for {hf_model_name!r}")


def vocab(arch: str):
    return SPECIAL[arch][0] + WORDPIECE


def pad_id(arch: str) -> int:
    specials, _, roles = SPECIAL[arch]
    return specials.index(roles["pad_token"])


def config(arch: str):
    """The architecture's transformers config, tiny; ids as its real tokenizer's."""
    ids = {role: SPECIAL[arch][0].index(tok) for role, tok in SPECIAL[arch][2].items()}
    common = dict(vocab_size=len(vocab(arch)), pad_token_id=ids["pad_token"], eos_token_id=ids["eos_token"])
    if arch == "bert":
        return BertConfig(**SIZES, **common, max_position_embeddings=CONTEXT)
    if arch in ("roberta", "xlm-roberta"):  # positions counted from the padding index
        cls = RobertaConfig if arch == "roberta" else XLMRobertaConfig
        return cls(**SIZES, **common, bos_token_id=0, max_position_embeddings=CONTEXT + ids["pad_token"] + 1)
    if arch == "mt5":
        return MT5Config(vocab_size=common["vocab_size"], d_model=32, d_kv=16, d_ff=64, num_layers=2,
                         num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16, pad_token_id=common["pad_token_id"],
                         eos_token_id=common["eos_token_id"], decoder_start_token_id=common["pad_token_id"])
    return M2M100Config(d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=CONTEXT, scale_embedding=True, bos_token_id=0, **common)


def write(folder: Path, hf_model_name: str) -> Path:
    """folder/<architecture>: the tiny config and tokenizer for `hf_model_name` (written once)."""
    arch = architecture(hf_model_name)
    out = Path(folder) / arch
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        config(arch).save_pretrained(out)
        _, template, roles = SPECIAL[arch]
        write_wordpiece(out, vocab(arch), template, CONTEXT, **roles)
    return out
