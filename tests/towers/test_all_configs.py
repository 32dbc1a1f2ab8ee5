"""Every open_clip configuration, shrunk (tests/tiny_families.py: same classes and switches, 2 blocks,
small widths; a Hugging Face text tower becomes a tiny local one of its architecture,
tests/tiny_hf_text.py), offline: it builds, a fresh model computes the backbone's encode_image /
encode_text bit for bit, and the fused path equals the reference in features and every gradient;
or, for a tower type NEARL-CLIP does not step, building stops with a ValueError naming it.

The configurations are grouped into families by (image tower, text tower). Each run tests one
configuration of every family, drawn with a seed every test id carries ("ViT-B-16@seed123"; printed to
stderr too, shown with -s); NEARL_ALL_CONFIGS_SEED=<seed> draws the same again; NEARL_ALL_CONFIGS=1
tests all of them."""
import os
import random
import sys
from collections import defaultdict
from pathlib import Path

import open_clip
import pytest
import timm
import torch

import nearl
from model_helpers import assert_fused_matches_reference, perturb_adapters
from tiny_families import register
import tiny_hf_text

ADAPTS = "adapts"
# The one table: a tower (image: open_clip class or the timm module of a TimmModel's trunk; text: open_clip
# class or the architecture of an HFTextEncoder's model) -> "adapts" or "refused: <what the ValueError says>".
# A configuration adapts when both its towers do.
EXPECTED = {
    "VisionTransformer": ADAPTS,
    "ModifiedResNet": ADAPTS,
    "timm vision_transformer": ADAPTS,  # CLIP-style and SigLIP (attention pooling) ViTs
    "timm vision_transformer_hybrid": ADAPTS,  # MobileCLIP-B: a ViT on a convolutional stem
    "timm vitamin": ADAPTS,  # a ViT on MbConv stages
    "timm eva": ADAPTS,  # EVA01, EVA02, PE-Core
    "timm vision_transformer_relpos": ADAPTS,
    "timm convnext": ADAPTS,
    "timm swin_transformer": ADAPTS,
    "timm fastvit": ADAPTS,  # MobileCLIP S*
    "text inline": ADAPTS,  # open_clip CLIP's own text transformer
    "TextTransformer": ADAPTS,  # custom_text, SigLIP's included
    "CoCa text": ADAPTS,
    "hf roberta": ADAPTS,
    "hf xlm-roberta": ADAPTS,
    "hf mt5": ADAPTS,
    "hf m2m_100": ADAPTS,  # NLLB
}


def towers(name: str):
    """(image tower, text tower) of open_clip's config `name`, as EXPECTED names them."""
    cfg = open_clip.get_model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in vision:
        image = "timm " + timm.models.model_entrypoint(vision["timm_model_name"]).__module__.rsplit(".", 1)[-1]
    else:
        image = "ModifiedResNet" if isinstance(vision.get("layers"), (list, tuple)) else "VisionTransformer"
    if "hf_model_name" in text:
        words = "hf " + tiny_hf_text.architecture(text["hf_model_name"])
    elif "multimodal_cfg" in cfg:
        words = "CoCa text"
    else:
        words = "TextTransformer" if cfg.get("custom_text") else "text inline"
    return image, words


def expected(name: str) -> str:
    outcomes = [EXPECTED[t] for t in towers(name)]
    return next((o for o in outcomes if o != ADAPTS), ADAPTS)


# the configurations open_clip ships (not those the suite or nearl registers: tiny-*, NEARL-Tiny*)
ALL = sorted(p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json"))
FAMILIES = defaultdict(list)
for _name in ALL:
    FAMILIES[towers(_name)].append(_name)
SEED = int(os.environ.get("NEARL_ALL_CONFIGS_SEED") or random.SystemRandom().randrange(10 ** 6))
if os.environ.get("NEARL_ALL_CONFIGS") == "1":
    SAMPLE = ALL
else:
    _rng = random.Random(SEED)
    SAMPLE = sorted(_rng.choice(members) for _, members in sorted(FAMILIES.items()))
print(f"test_all_configs: {len(SAMPLE)} of {len(ALL)} open_clip configurations, NEARL_ALL_CONFIGS_SEED={SEED}",
      file=sys.stderr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("all-configs")


def text_ids(name: str, n: int = 2) -> torch.Tensor:
    """(n, 16) token ids as the config's tokenizer would lay them out (the tokenizers themselves need
    downloads): text, then its end token, then padding; the second row padded. open_clip's text
    pools at its highest id, at `eos_id` or at the last token; a Hugging Face one masks its pad id."""
    cfg = open_clip.get_model_config(name)["text_cfg"]
    context = tiny_hf_text.CONTEXT
    if "hf_model_name" in cfg:
        arch = tiny_hf_text.architecture(cfg["hf_model_name"])
        specials, _, roles = tiny_hf_text.SPECIAL[arch]
        low, high = len(specials), len(tiny_hf_text.vocab(arch))
        end, pad = specials.index(roles["eos_token"]), tiny_hf_text.pad_id(arch)
    else:
        vocab = cfg.get("vocab_size", 49408)
        low, high, pad = 3, min(vocab - 1, 1000), cfg.get("pad_id", 0)
        end = cfg.get("eos_id", 2) if cfg.get("pool_type") == "eos" else vocab - 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(low, high, (n, context), generator=g)
    for row, length in enumerate([context, 6][:n]):
        ids[row, length - 1], ids[row, length:] = end, pad
    return ids


@pytest.mark.parametrize("name", SAMPLE, ids=[f"{n}@seed{SEED}" for n in SAMPLE])
def test_a_shrunk_config_adapts_bit_for_bit_or_is_refused_by_name(folder, name):
    tiny = register(folder, name)
    torch.manual_seed(0)
    outcome = expected(name)
    if outcome != ADAPTS:
        with pytest.raises(ValueError, match=outcome.split("refused: ", 1)[1]):
            nearl.build(tiny)
        return
    model = nearl.build(tiny)
    side = model.tower("vision").image_size
    images = torch.randn(2, 3, *side, generator=torch.Generator().manual_seed(1))
    tokens = text_ids(name)
    bb = model.backbone
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), bb.encode_image(images, normalize=False))
        assert torch.equal(model.encode_text(tokens), bb.encode_text(tokens, normalize=False))
    perturb_adapters(model)
    # FastViT's tiny 3 x 3 maps leave USEformer's key gradient 1e-5 of the others: their noise, 1e-6
    assert_fused_matches_reference(model, images, tokens, floor=1e-6)


def test_every_family_has_an_expectation_and_is_drawn():
    assert set(t for family in FAMILIES for t in family) == set(EXPECTED)  # none missing, none stale
    assert {towers(n) for n in SAMPLE} == set(FAMILIES)
    assert all(o == ADAPTS or o.startswith("refused: ") for o in EXPECTED.values())
