"""Tip-Adapter, Tip-Adapter-F and CLIP-LoRA (issue 26, item 8): built on a random NEARL-Tiny, trained
through nearl.train, restored from their checkpoints, and run by nearl.compare on the demo set."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nearl import compare as CMP
from nearl.evaluation import run as EV
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.model.classify import zero_shot_classifier
from nearl.data.datasets import LabelledDataset
from nearl.data.labelled import read_image_folder
from nearl.data.manifests import read_manifest
from nearl.methods.clip_lora import CLIPLoRAConfig, add_lora
from nearl.methods.tip_adapter import ALPHAS, BETAS
from train_helpers import FAST, make_image_folder, make_manifest, run, train_losses

KW = dict(device="cpu", batch_size=8, workers=0, progress=False)


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    return images, model.tokenizer()(["a chest x-ray", "lateral view of the chest with a small effusion", "x"])


def _frozen(model):
    """The backbone's frozen tensors (LoRA wraps modules in place: their names lose the wrapper)."""
    learnt = set(model.trainable_state_dict())
    return {k.replace(".inner.", "."): v.clone() for k, v in model.backbone.state_dict().items()
            if f"backbone.{k}" not in learnt}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiplora")
    return {"manifest": make_manifest(root / "data", n_train=8, n_val=4),
            "folder": make_image_folder(root / "folder", per_class=(4, 2))}


# ----------------------------------------------------------------------------- CLIP-LoRA
def test_clip_lora_fresh_is_frozen_clip_bit_for_bit():
    model = MT.build_method("lora", "NEARL-Tiny", seed=3)
    ref = MT.build_method("zeroshot", "NEARL-Tiny", seed=3)
    images, tokens = _inputs(model)
    assert MT.method_of(model) == "clip-lora"
    # r = 2 on q, k, v: A (3 x 2 x d) and B (3 x d x 2) in each block of both towers
    blocks = [b.attn.embed_dim for kind in ("vision", "text") for b in model.tower(kind).blocks]
    assert model.num_trainable_parameters() == sum(2 * 3 * 2 * d for d in blocks) > 0
    for mode in (True, False):  # training mode too: a no_grad forward runs the modules themselves
        model.train(mode)
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), ref.encode_image(images))
            assert torch.equal(model.encode_text(tokens), ref.encode_text(tokens))
    # The LoRA updates are in the path of both towers once B is not zero ...
    with torch.no_grad():
        for lora in model.lora.modules():
            if hasattr(lora, "B"):
                lora.B.normal_(0, 0.05)
        model.eval()
        img, txt = model.encode_image(images), model.encode_text(tokens)
    assert not torch.allclose(img, ref.encode_image(images), atol=1e-4)
    assert not torch.allclose(txt, ref.encode_text(tokens), atol=1e-4)
    # ... and a training forward (dropout on the LoRA input, attention written out) is the same function
    for lora in model.lora.modules():
        if hasattr(lora, "drop"):
            lora.drop.p = 1e-12  # dropping, but keeping everything
    model.train()
    torch.testing.assert_close(model.encode_image(images), img, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.encode_text(tokens), txt, rtol=0, atol=1e-5)


def test_clip_lora_wraps_a_timm_vit_too():
    import tiny_timm
    name = tiny_timm.register()
    model, ref = MT.build_method("clip-lora", name, seed=1), MT.build_method("zeroshot", name, seed=1)
    images = torch.randn(2, 3, 32, 32)
    assert model.num_trainable_parameters() == 2 * (2 * 3 * 2 * 64) + 2 * (2 * 3 * 2 * 48)  # 64-wide ViT, 48 text
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
        for lora in model.lora["vision"].modules():
            if hasattr(lora, "B"):
                lora.B.normal_(0, 0.05)
        assert not torch.allclose(model.encode_image(images), ref.encode_image(images), atol=1e-4)


def test_clip_lora_refuses_other_towers():
    with pytest.raises(ValueError, match="clip-lora: the vision tower is a object; LoRA is wired here into"):
        add_lora(object(), CLIPLoRAConfig(), "vision")
    with pytest.raises(ValueError, match="dropout must be in"):
        CLIPLoRAConfig(dropout=1.0)


def test_clip_lora_trains_only_lora_and_checkpoint_rebuilds(tmp_path, data):
    out = tmp_path / "lora"
    summary = run(["--method", "clip-lora", "--task", "retrieval", "--model", "NEARL-Tiny", "--data",
                   data["manifest"], "--batch-size", 8, "--max-steps", 2, "--warmup", 0, "--lr", 1e-2,
                   "--lora-rank", 3, "--out", out, *FAST])
    assert summary["step"] == 2 and summary["method"] == "clip-lora"
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["rank"] == 3 and ckpt["config"]["dropout"] == 0.25
    model = MT.build_from_checkpoint(ckpt)
    fresh = MT.build_method("clip-lora", "NEARL-Tiny", seed=0, **ckpt["config"])
    assert set(ckpt["model"]) == set(fresh.trainable_state_dict()) and all(k.startswith("lora.") for k in ckpt["model"])
    before, after = _frozen(fresh), _frozen(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    moved = [k for k, v in model.trainable_state_dict().items() if not torch.equal(v, fresh.trainable_state_dict()[k])]
    assert any(k.endswith(".B") for k in moved)  # B left zero: the updates are on
    losses, recs = train_losses(out)
    last_val = [r for r in recs if r["kind"] == "val"][-1]
    res = EV.evaluate_retrieval(model, [r for r in read_manifest(data["manifest"]) if r.split == "val"], **KW)
    assert res["mean_recall"] == pytest.approx(last_val["mean_recall"])


# ----------------------------------------------------------------------------- Tip-Adapter
def test_tip_adapter_builds_its_cache_searches_and_checkpoints(tmp_path, data):
    out = tmp_path / "tip"
    summary = run(["--method", "tip-adapter", "--task", "classification", "--model", "NEARL-Tiny", "--data",
                   data["folder"], "--max-steps", 5, "--out", out, *FAST])
    assert summary["step"] == 0 and summary["learnable_parameters"] == 0  # training-free
    ckpt = load_checkpoint(out)
    cfg = ckpt["config"]
    assert cfg["cache_size"] == 12 and cfg["classnames"] == ["blue", "green", "red"] and cfg["searched"]
    assert cfg["alpha"] in ALPHAS and cfg["beta"] in BETAS
    assert ckpt["model"]["cache_keys"].shape == (12, 32) and ckpt["model"]["cache_values"].sum() == 12
    model = MT.build_from_checkpoint(ckpt)
    val, names = read_image_folder(data["folder"] / "val")
    train, _ = read_image_folder(data["folder"] / "train")
    # The keys are the training images' normalised frozen features, the values their one-hot labels.
    kept, feats = EV.encode_images(model, LabelledDataset(train, model.image_transform(False)), **KW)
    assert len(kept) == 12
    torch.testing.assert_close(model.cache_keys, F.normalize(feats, dim=-1))
    # logits = logit_scale f W^T + alpha exp(-beta (1 - f K^T)) V, written out
    f = F.normalize(torch.randn(4, 32), dim=-1)
    classes = zero_shot_classifier(model, names)
    expect = model.logit_scale * f @ classes.T + cfg["alpha"] * torch.exp(
        -cfg["beta"] * (1 - f @ model.cache_keys.T)) @ model.cache_values
    torch.testing.assert_close(model.classification_logits(f, names), expect)
    res = EV.evaluate_classification(model, val, names, **KW)
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert res["accuracy"] == pytest.approx([r for r in recs if r["kind"] == "val"][-1]["accuracy"])
    with pytest.raises(ValueError, match="cannot score new classes"):
        EV.evaluate_classification(model, val, names[::-1], **KW)
    assert not MT.spec("tip-adapter").scores_unseen_classes and MT.spec("tip").tasks == ("classification",)


def test_tip_adapter_keeps_the_defaults_without_search(tmp_path, data):
    out = tmp_path / "tip-nosearch"
    run(["--method", "tip", "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
         "--no-tip-search", "--tip-beta", 3, "--out", out, *FAST])
    cfg = load_checkpoint(out)["config"]
    assert (cfg["alpha"], cfg["beta"], cfg["searched"]) == (1.0, 3.0, False)
    with pytest.raises(ValueError, match="does not apply to task 'retrieval'"):
        run(["--method", "tip-adapter", "--task", "retrieval", "--model", "NEARL-Tiny", "--data", data["manifest"],
             "--out", tmp_path / "x", *FAST])


def test_tip_adapter_f_trains_only_its_keys(tmp_path, data):
    out = tmp_path / "tipf"
    summary = run(["--method", "tip-adapter-f", "--task", "classification", "--model", "NEARL-Tiny", "--data",
                   data["folder"], "--batch-size", 6, "--max-steps", 2, "--warmup", 0, "--lr", 1e-2,
                   "--out", out, *FAST])
    assert summary["step"] == 2 and summary["learnable_parameters"] == 12 * 32  # N x E
    ckpt = load_checkpoint(out)
    model = MT.build_from_checkpoint(ckpt)
    fresh = MT.build_method("tip-adapter-f", "NEARL-Tiny", seed=0, **ckpt["config"])
    before, after = _frozen(fresh), _frozen(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone untouched
    assert torch.equal(model.cache_values, ckpt["model"]["cache_values"]) and model.cache_values.sum() == 12
    assert model.cache_keys.requires_grad and not model.cache_values.requires_grad
    val, names = read_image_folder(data["folder"] / "val")
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    res = EV.evaluate_classification(model, val, names, **KW)
    assert res["accuracy"] == pytest.approx([r for r in recs if r["kind"] == "val"][-1]["accuracy"])


def test_tip_adapter_f_moves_the_keys_from_the_cache(tmp_path, data):
    """One step: the keys leave the normalised features they started from; nothing else moves."""
    outs = {}
    for method, steps in (("tip-adapter", 1), ("tip-adapter-f", 1)):
        outs[method] = tmp_path / method
        run(["--method", method, "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
             "--batch-size", 6, "--max-steps", steps, "--warmup", 0, "--lr", 1e-2, "--out", outs[method], *FAST])
    tip, tipf = (load_checkpoint(outs[m]) for m in ("tip-adapter", "tip-adapter-f"))
    assert torch.equal(tip["model"]["cache_values"], tipf["model"]["cache_values"])
    assert (tip["config"]["alpha"], tip["config"]["beta"]) == (tipf["config"]["alpha"], tipf["config"]["beta"])
    assert not torch.equal(tip["model"]["cache_keys"], tipf["model"]["cache_keys"])
    assert (tip["model"]["cache_keys"] - tipf["model"]["cache_keys"]).abs().max() < 0.1


# ----------------------------------------------------------------------------- nearl.compare
def test_compare_runs_tip_adapter_and_lora_on_the_demo_set(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))
    out = tmp_path / "cmp"
    report = CMP.main(["--methods", "tip-adapter,tip-adapter-f,lora", "--seeds", "0", "--max-steps", "1",
                       "--batch-size", "8", "--bench-batch", "2", "--bench-iters", "1", "--out", str(out), *FAST])
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved["methods"]) == ["tip-adapter", "tip-adapter-f", "clip-lora"]
    steps = {m: [r["steps"] for r in v["runs"]] for m, v in saved["methods"].items()}
    assert steps == {"tip-adapter": [0], "tip-adapter-f": [1], "clip-lora": [1]}
    params = {m: v["learnable_parameters"] for m, v in report["methods"].items()}
    assert params["tip-adapter"] == 0 and params["tip-adapter-f"] > 0 and params["clip-lora"] > 0
    md = (out / "comparison.md").read_text()
    assert "| Tip-Adapter |" in md or "| tip-adapter |" in md
