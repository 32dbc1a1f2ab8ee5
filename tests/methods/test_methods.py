"""The comparison methods (nearl/methods/): ALTA is the frozen CLIP at init and computes the stated
block; parameter counts on ViT-B-16 follow the formulas; every method trains on the tiny backbone
through nearl.train (its loss falls), its checkpoint names it and rebuilds it; a method that does
not apply to a task says so."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nearl
from nearl import evaluate as E
from nearl.evaluation import run as EV
from nearl import methods as MT
from nearl.store.checkpoint import load_checkpoint
from nearl.data.labelled import read_image_folder
from nearl.data.manifests import read_manifest
from nearl.methods.alta import ALTA, ALTAConfig, adapted_block
from nearl.model.nearl_clip import create_backbone
from train_helpers import _one_thread, FAST, make_image_folder, make_manifest, run, train_losses

KW = dict(device="cpu", batch_size=8, workers=0, progress=False)


def _randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every learnable tensor non-zero random values (so the adapters do real work)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = model.tokenizer()(["a chest x-ray", "lateral view of the chest with a small effusion", "x"][:n])
    return images, tokens


# ----------------------------------------------------------------------------- ALTA
def test_alta_fresh_is_frozen_clip_bit_for_bit():
    model = MT.build_method("alta", "NEARL-Tiny", seed=3)
    images, tokens = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.backbone.encode_image(images))
        assert torch.equal(model.encode_text(tokens), model.backbone.encode_text(tokens))
        out = model(images, tokens)
        assert out.image_queries is None and out.text_queries is None and out.orth_penalty is None
        # The adapters are really in the path: non-zero up-projections change both towers.
        _randomise(model)
        assert not torch.allclose(model.encode_image(images), model.backbone.encode_image(images), atol=1e-4)
        assert not torch.allclose(model.encode_text(tokens), model.backbone.encode_text(tokens), atol=1e-4)


def test_alta_block_is_the_stated_formula():
    """x = x + attn(ln_1 x); x = x + A1(x); x = x + mlp(ln_2 x) + 0.5 A2(ln_2 x), written out here with
    nn.MultiheadAttention called directly, for the text tower's causal mask."""
    model = MT.build_method("alta", "NEARL-Tiny", seed=1)
    _randomise(model, seed=2, scale=0.2)
    block = model.tower("text").blocks[0]
    ad = model.adapters["text"][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 48, generator=g)
    mask = model.backbone.attn_mask
    with torch.no_grad():
        h = block.ln_1(x)
        a = block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x1 = x + a
        x2 = x1 + ad.attn.up(F.gelu(ad.attn.down(x1)))
        h2 = block.ln_2(x2)
        mlp = block.mlp.c_proj(F.gelu(block.mlp.c_fc(h2)))
        expected = x2 + mlp + 0.5 * ad.mlp.up(F.gelu(ad.mlp.down(h2)))
        got = adapted_block(model.tower("text"), 0, x, ad, 0.5, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_alta_trains_only_adapters_norms_projections():
    model = MT.build_method("alta", "NEARL-Tiny")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    backbone = {n for n in names if n.startswith("backbone.")}
    assert backbone and all(".ln_" in n or n.endswith(("ln_pre.weight", "ln_pre.bias", "ln_post.weight",
                                                       "ln_post.bias", "ln_final.weight", "ln_final.bias"))
                            or n in ("backbone.visual.proj", "backbone.text_projection") for n in backbone), backbone
    assert {"backbone.visual.proj", "backbone.text_projection", "backbone.visual.ln_post.weight",
            "backbone.ln_final.weight"} <= backbone
    assert not any("attn.in_proj" in n or "mlp.c_fc" in n or "conv1" in n for n in names)


@pytest.fixture(scope="module")
def vit_b16():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return create_backbone("ViT-B-16")  # random weights: nothing downloaded


def test_parameter_counts_vit_b16(vit_b16):
    """Every method's learnable parameters on ViT-B-16, against formulas written out here."""
    from nearl.methods.alta import ALTA
    from nearl.methods.clip_adapter import CLIPAdapter, CLIPAdapterConfig
    from nearl.methods.coop import CoOp
    from nearl.methods.linear_probe import LinearProbe, LinearProbeConfig
    from nearl.methods.zeroshot import ZeroShot

    dv, dt, L, E_ = 768, 512, 12, 512  # vision width, text width, blocks per tower, embedding

    def adapters(d):  # two per block: Linear d -> d/4 (+ bias), Linear d/4 -> d (+ bias)
        return 2 * (d * d // 4 + d // 4 + d // 4 * d + d)

    norms = 2 * dv * (1 + 2 * L + 1) + 2 * dt * (2 * L + 1)  # ln_pre, ln_1/ln_2 per block, ln_post; ln_final
    projections = dv * E_ + dt * E_  # visual.proj (768 x 512), text_projection (512 x 512)
    alta = L * adapters(dv) + L * adapters(dt) + norms + projections
    assert alta == 10_982_912  # the formula itself, spelled out as a number
    counts = {}
    counts["alta"] = ALTA(vit_b16, ALTAConfig()).num_trainable_parameters()
    counts["alta multiview"] = ALTA(vit_b16, ALTAConfig(multiview=True)).num_trainable_parameters()
    counts["clip-adapter"] = CLIPAdapter(vit_b16, CLIPAdapterConfig()).num_trainable_parameters()
    counts["coop"] = CoOp(vit_b16).num_trainable_parameters()
    counts["linear-probe"] = LinearProbe(vit_b16, LinearProbeConfig(num_classes=6)).num_trainable_parameters()
    counts["zeroshot"] = ZeroShot(vit_b16).num_trainable_parameters()
    counts["nearl"] = nearl.NEARLCLIP(vit_b16, nearl.NEARLConfig()).num_trainable_parameters()
    assert counts == {
        "alta": alta,
        "alta multiview": alta + 2 * dv + 2 * dv,  # view (frontal, lateral) + time (current, prior) embeddings
        "clip-adapter": 2 * (E_ * E_ // 4 + E_ // 4 * E_),  # image + text adapter, no biases
        "coop": 16 * dt,  # M = 16 context vectors of the text width
        "linear-probe": E_ * 6 + 6,  # 6 classes, with bias
        "zeroshot": 0,
        "nearl": 1_428_632,  # docs/comparison.md / SPEC 3.1
    }


# ----------------------------------------------------------------------------- registry
def test_registry_names_errors_and_same_backbone_per_seed():
    assert MT.canonical("CLIP_Adapter") == "clip-adapter" and MT.canonical("zero-shot") == "zeroshot"
    assert MT.canonical("lora") == "clip-lora" and MT.canonical("Tip") == "tip-adapter"
    with pytest.raises(ValueError, match="unknown method 'maple'"):
        MT.canonical("maple")
    for method in ("coop", "linear-probe"):
        with pytest.raises(ValueError, match=f"method '{method}' does not apply to task 'retrieval'"):
            MT.check_task(method, "retrieval")
    with pytest.raises(ValueError, match="has no option"):
        MT.build_method("clip-adapter", "NEARL-Tiny", n_ctx=4)
    # One seed, one backbone: every method wraps the same random weights (the comparison is fair).
    ref = MT.build_method("nearl", "NEARL-Tiny", seed=7).backbone.state_dict()
    other = MT.build_method("nearl", "NEARL-Tiny", seed=8).backbone.state_dict()
    assert not all(torch.equal(ref[k], other[k]) for k in ref)
    for method in ("alta", "clip-adapter", "coop", "zeroshot"):
        sd = MT.build_method(method, "NEARL-Tiny", seed=7).backbone.state_dict()
        assert all(torch.equal(ref[k], sd[k]) for k in ref), method


def test_coop_prompts_put_the_learned_context_in_place():
    model = MT.build_method("coop", "NEARL-Tiny", n_ctx=4)
    tokens = model.class_prompt_tokens(["pleural_effusion", "ct"])
    x_id = model.tokenizer().encode("X")[0]
    assert (tokens[:, 1:5] == x_id).all() and tokens.shape[0] == 2
    with torch.no_grad():
        before = model.prompt_tower(tokens).features
        model.ctx.add_(1.0)
        after = model.prompt_tower(tokens).features
        # with the context set to the placeholder's own embedding, the prompt is the plain text
        model.ctx.copy_(model.backbone.token_embedding.weight[x_id].expand(4, -1))
        plain = model.prompt_tower(tokens).features
    assert not torch.allclose(before, after)
    torch.testing.assert_close(plain, model.backbone.encode_text(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs .* tokens"):
        model.class_prompt_tokens(["a very long class name that cannot possibly fit in sixteen tokens"])


# ----------------------------------------------------------------------------- training through nearl.train
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {"manifest": make_manifest(root / "data", n_train=8, n_val=4),
            "folder": make_image_folder(root / "folder", per_class=(4, 2))}


def _frozen_snapshot(model):
    return {k: v.clone() for k, v in model.backbone.state_dict().items()
            if k not in {n[len("backbone."):] for n in model.trainable_state_dict()}}


@pytest.mark.parametrize("method,task,lr", [
    ("alta", "retrieval", 3e-3),
    ("clip-adapter", "retrieval", 5e-2),
    ("coop", "classification", 1e-2),
    ("biomedcoop", "classification", 1e-2),
])
def test_method_trains_loss_falls_and_checkpoint_rebuilds(tmp_path, data, method, task, lr):
    out = tmp_path / method
    src = data["manifest"] if task == "retrieval" else data["folder"]
    summary = run(["--method", method, "--task", task, "--model", "NEARL-Tiny", "--data", src,
                   "--batch-size", 8 if task == "retrieval" else 6, "--max-steps", 8, "--warmup", 1,
                   "--lr", lr, "--eval-every", 0, "--out", out, *FAST])
    assert summary["step"] == 8 and summary["method"] == method
    losses, recs = train_losses(out)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert "query_alignment" not in recs[0]  # no queries, no query term

    ckpt = load_checkpoint(out)
    assert ckpt["method"] == method and ckpt["task"] == task
    model = MT.build_from_checkpoint(ckpt)
    assert MT.method_of(model) == method
    assert sum(v.numel() for v in ckpt["model"].values()) == model.num_trainable_parameters() == \
        summary["learnable_parameters"] > 0
    fresh = MT.build_method(method, "NEARL-Tiny", seed=0, **ckpt["config"])
    frozen_fresh, frozen_loaded = _frozen_snapshot(fresh), _frozen_snapshot(model)
    assert all(torch.equal(frozen_fresh[k], frozen_loaded[k]) for k in frozen_fresh)  # backbone untouched
    assert any(not torch.equal(v, fresh.trainable_state_dict()[k]) for k, v in model.trainable_state_dict().items())
    # The rebuilt model reproduces the run's own final validation.
    last_val = [r for r in recs if r["kind"] == "val"][-1]
    if task == "retrieval":
        res = EV.evaluate_retrieval(model, [r for r in read_manifest(src) if r.split == "val"], **KW)
        assert res["mean_recall"] == pytest.approx(last_val["mean_recall"])
    else:
        val, names = read_image_folder(src / "val")
        res = EV.evaluate_classification(model, val, names, **KW)
        assert res["accuracy"] == pytest.approx(last_val["accuracy"])
        assert res["macro_auc"] == pytest.approx(last_val["macro_auc"])


def test_alta_classification_and_evaluate_cli(tmp_path, data):
    out = tmp_path / "alta-cls"
    run(["--method", "alta", "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
         "--batch-size", 6, "--max-steps", 3, "--lr", 3e-3, "--eval-every", 0, "--out", out, *FAST])
    rep = E.main(["--checkpoint", str(out), "--data", str(data["folder"]), "--split", "val", "--workers", "0",
                  "--no-progress", "--out", str(tmp_path / "res")])
    assert rep["method"] == "alta" and rep["task"] == "classification"
    assert rep["learnable_parameters"] == 18_192  # NEARL-Tiny: printed by the breakdown, fixed by its widths
    last_val = [json.loads(l) for l in open(out / "metrics.jsonl")][-1]
    assert rep["metrics"]["accuracy"] == pytest.approx(last_val["accuracy"])
    assert "| alta (last.pt, step 3) |" in (tmp_path / "res" / "results.md").read_text()
    with pytest.raises(ValueError, match="holds method 'alta'"):
        E.main(["--checkpoint", str(out), "--method", "coop", "--data", str(data["folder"]), "--workers", "0",
                "--no-progress"])


def test_linear_probe_fits_and_searches_weight_decay(tmp_path, data):
    out = tmp_path / "lp"
    summary = run(["--method", "linear-probe", "--task", "classification", "--model", "NEARL-Tiny",
                   "--data", data["folder"], "--max-steps", 10, "--probe-wd", "0,0.01,1.0", "--out", out, *FAST])
    losses, recs = train_losses(out)
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0], losses
    searched = [r for r in recs if r["kind"] == "search"]
    assert [r["weight_decay"] for r in searched] == [0.0, 0.01, 1.0]
    best = max(searched, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert summary["weight_decay"] == best["weight_decay"]
    ckpt = load_checkpoint(out)
    assert ckpt["method"] == "linear-probe" and ckpt["config"]["weight_decay"] == summary["weight_decay"]
    model = MT.build_from_checkpoint(ckpt)
    assert model.num_trainable_parameters() == 32 * 3 + 3  # NEARL-Tiny embedding 32, 3 classes
    val, names = read_image_folder(data["folder"] / "val")
    res = EV.evaluate_classification(model, val, names, **KW)
    assert res["accuracy"] == pytest.approx([r for r in recs if r["kind"] == "val"][-1]["accuracy"])
    with pytest.raises(ValueError, match="cannot score new classes"):
        EV.evaluate_classification(model, val, names + ["purple"], **KW)


def test_zeroshot_trains_nothing_and_evaluates_the_frozen_clip(tmp_path, data):
    out = tmp_path / "zs"
    summary = run(["--method", "zeroshot", "--task", "classification", "--model", "NEARL-Tiny", "--seed", 4,
                   "--data", data["folder"], "--max-steps", 5, "--out", out, *FAST])
    assert summary["step"] == 0 and summary["learnable_parameters"] == 0
    losses, recs = train_losses(out)
    assert losses == [] and [r["kind"] for r in recs] == ["val"]
    ckpt = load_checkpoint(out)
    assert ckpt["method"] == "zeroshot" and ckpt["model"] == {}
    # The same numbers as a fresh NEARL model (which is the frozen CLIP) built under the same seed.
    val, names = read_image_folder(data["folder"] / "val")
    zs = EV.evaluate_classification(MT.build_from_checkpoint(ckpt), val, names, **KW)
    ref = EV.evaluate_classification(MT.build_method("nearl", "NEARL-Tiny", seed=4), val, names, **KW)
    assert zs["accuracy"] == pytest.approx(recs[0]["accuracy"]) == pytest.approx(ref["accuracy"])
    assert zs["macro_auc"] == pytest.approx(ref["macro_auc"])


@pytest.mark.parametrize("method", ["coop", "linear-probe"])
def test_classification_only_methods_refuse_retrieval(tmp_path, data, method):
    with pytest.raises(ValueError, match=f"method '{method}' does not apply to task 'retrieval'"):
        run(["--method", method, "--task", "retrieval", "--model", "NEARL-Tiny", "--data", data["manifest"],
             "--max-steps", 1, "--out", tmp_path / "x", *FAST])
    with pytest.raises(ValueError, match=f"method '{method}' does not apply to task 'retrieval'"):
        E.main(["--method", method, "--model", "NEARL-Tiny", "--task", "retrieval", "--data",
                str(data["manifest"]), "--workers", "0", "--no-progress"])


def test_prompt_classifier_without_queries_skips_query_term():
    from nearl.model.classify import ClassificationLoss, PromptClassifier, class_prompt_tokens
    model = MT.build_method("clip-adapter", "NEARL-Tiny")
    clf = PromptClassifier(model, class_prompt_tokens(model, ["red", "blue"], ["a {} image."]), 2)
    out = clf(torch.randn(4, 3, 32, 32))
    assert out.image_queries is None and out.class_queries is None and out.logits.shape == (4, 2)
    terms = ClassificationLoss(lambda_q=0.5)(out, torch.tensor([0, 1, 0, 1]))
    assert set(terms) == {"cross_entropy", "loss"} and torch.equal(terms["loss"], terms["cross_entropy"])


def test_the_registry_holds_every_method_once_with_its_options():
    """Each method's module declares its SPEC; nearl is one of them (not patched in), a flag two
    methods share is added once and names both, and the options that shape a model are those a
    resumed run keeps."""
    from nearl import training as T
    from nearl.model.nearl_clip import NEARLCLIP
    assert MT.METHODS == ("nearl", "alta", "clip-adapter", "coop", "biomedcoop", "linear-probe", "zeroshot",
                          "tip-adapter", "tip-adapter-f", "clip-lora")
    for name in MT.METHODS:
        assert MT.spec(name).name == name and MT.spec(name).model_cls.method == name
    assert MT.spec("nearl").model_cls is NEARLCLIP and MT.method_of(MT.build_method("nearl", "NEARL-Tiny")) == "nearl"
    actions = [a for a in T.build_parser()._actions if "--reduction" in a.option_strings]
    assert len(actions) == 1 and actions[0].help.startswith("alta, clip-adapter:"), [a.help for a in actions]
    assert set(T.FIXED_ON_RESUME) == {"method", "task", "model", "seed", "classes", "num_queries", "query_dim",
                                      "heads", "rank", "vision_layers", "text_layers", "reduction", "n_ctx",
                                      "multiview", "lora_rank"}
    assert MT.method_config("coop", T.parse_config(["--method", "coop", "--n-ctx", "3"])) == {"n_ctx": 3}
    # --n-ctx is shared; not given, each method takes its own default
    assert MT.method_config("coop", T.parse_config(["--method", "coop"])) == {"n_ctx": 16}
    assert MT.method_config("biomedcoop", T.parse_config(["--method", "biomedcoop"]))["n_ctx"] == 4
    with pytest.raises(ValueError, match="registered twice"):
        MT.register(MT.spec("coop"))


def test_a_checkpoint_from_before_methods_were_recorded_restores_nearl(tmp_path):
    """Version-1 files written before checkpoints named their method hold NEARL-CLIP."""
    from nearl.store import checkpoint as C
    model = MT.build_method("nearl", "NEARL-Tiny", seed=3)
    state = C.training_state(model_name="NEARL-Tiny", pretrained=None, backbone_seed=3, method="nearl",
                             config=model.config.to_dict(), task="retrieval", classnames=None, templates=None,
                             model=model.trainable_state_dict(), optimizer=None, scheduler=None, scaler=None,
                             step=1, epoch=0, batch_in_epoch=1, rng=C.rng_state(), data={}, best=None, args={},
                             metrics={}, train_images=None)
    del state["method"]
    C.save_checkpoint(state, tmp_path)
    restored = MT.build_from_checkpoint(tmp_path)
    assert MT.method_of(restored) == "nearl"
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(restored.trainable_state_dict()[k], v), k
    with pytest.raises(ValueError, match="missing \\['method'\\]"):
        C.training_state(**{k: v for k, v in state.items()})
