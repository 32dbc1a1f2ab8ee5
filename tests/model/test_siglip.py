"""A SigLIP-style backbone (a learned logit bias, a text tower without causal mask pooled at its
last token; tests/model_configs/NEARL-Tiny-Sigmoid.json): stepped exactly, trained with SigLIP's loss."""
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

import nearl
from train_helpers import FAST, make_manifest, run, train_losses
from tiny_timm import register

register()  # makes tests/model_configs known to open_clip
NAME = "NEARL-Tiny-Sigmoid"  # open_clip picks a downloaded tokenizer for names holding "siglip"


def test_a_fresh_model_is_the_frozen_siglip_and_its_loss_is_siglips():
    model = nearl.build(NAME)
    assert model.logit_bias is not None and float(model.logit_bias) == -10.0
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = model.tokenizer()(["a chest x-ray with a small left effusion", "axial ct", "fundus photograph"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), model.backbone.encode_text(tokens))
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        out = model(images, tokens)
        terms = nearl.NEARLLoss.from_config(model.config)(out)
        want = SigLipLoss()(F.normalize(out.image_features, dim=-1), F.normalize(out.text_features, dim=-1),
                            model.logit_scale, model.logit_bias)
    assert torch.equal(terms["contrastive"], want)
    clip = nearl.build("NEARL-Tiny")
    assert clip.logit_bias is None and clip(images, clip.tokenizer()(["ct"] * 3)).logit_bias is None


def test_training_a_siglip_backbone(tmp_path):
    manifest = make_manifest(tmp_path / "data", n_train=8, n_val=4)
    summary = run(["--model", NAME, "--data", manifest, "--batch-size", 4, "--max-steps", 3, "--warmup", 1,
                   "--eval-every", 0, "--out", tmp_path / "run", *FAST])
    assert summary["step"] == 3
    losses, recs = train_losses(tmp_path / "run")
    assert all(np.isfinite(losses)) and "contrastive" in recs[0]
