"""BiomedCoOp (issue 26, item 8): its context starts from "a photo of a", its two extra terms are
what its code computes (the outlier rule included) against the descriptions given, with their
weights at 0 it is CoOp's loss; it trains through nearl.train, restores, resumes, and nearl.compare
runs it; a bad --class-descriptions file is one error naming the file and the classes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from nearl import compare as CMP
from nearl import methods as MT
from nearl.errors import UserError
from nearl.evaluation import run as EV
from nearl.data.labelled import read_image_folder
from nearl.methods.biomedcoop import _objective
from nearl.methods.biomedcoop_loss import kept_prompts
from nearl.model.classify import TEMPLATES, ClassificationLoss, PromptClassifier, class_prompt_tokens
from nearl.store.checkpoint import load_checkpoint
from nearl.training import TrainConfig
from train_helpers import FAST, make_image_folder, run, train_losses

CLASSES = ["blue", "green", "red"]
DESCRIPTIONS = {"red": ["a red image", "a crimson patch", "something scarlet", "the colour of blood"],
                "green": ["a green image", "the colour of grass", "an emerald patch"],
                "blue": ["a blue image", "the colour of the sky", "a navy patch"]}
KW = dict(device="cpu", batch_size=8, workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("biomedcoop")
    path = root / "descriptions.json"
    path.write_text(json.dumps(DESCRIPTIONS))
    return {"folder": make_image_folder(root / "folder", per_class=(4, 2)), "descriptions": path}


def _config(**options):
    return TrainConfig(method="biomedcoop", task="classification", method_options=options)


# ----------------------------------------------------------------------------- the model
def test_the_context_starts_from_a_photo_of_a():
    model = MT.build_method("biomedcoop", "NEARL-Tiny", seed=2)
    assert model.n_ctx == 4 and model.config.ctx_init == "a photo of a" and model.num_trainable_parameters() == 4 * 48
    tokens = model.class_prompt_tokens(["pleural_effusion"])
    with torch.no_grad():
        learned = model.prompt_tower(tokens).features
        plain = model.backbone.encode_text(model.tokenizer()(["a photo of a pleural effusion."]))
    assert torch.equal(learned, plain)  # the prompt is the hand-written one until it learns
    # "" (or words that are not n_ctx tokens): CoOp's random context, drawn as CoOp draws it
    coop = MT.build_method("coop", "NEARL-Tiny", seed=2, n_ctx=4)
    assert torch.equal(MT.build_method("biomedcoop", "NEARL-Tiny", seed=2, ctx_init="").ctx, coop.ctx)
    assert torch.equal(MT.build_method("biomedcoop", "NEARL-Tiny", seed=2, ctx_init="a photo").ctx, coop.ctx)
    assert MT.canonical("BiomedCoOp") == "biomedcoop" and MT.spec("biomed-coop").display_name == "BiomedCoOp"


@pytest.mark.parametrize("family", ["biomed", "clip", "siglip", "mt5-base-ViT-B-32", "nllb-clip-base"])
def test_the_context_starts_from_the_words_on_transformers_towers_too(tmp_path, family):
    """BiomedCLIP-style BERT ([CLS] first, embeddings normalised after the words), transformers' CLIP
    (<start> first), SigLIP and MT5 (no start token), NLLB (scaled word embeddings, after the language
    code): the words' own embeddings, where the words go."""
    import tiny_biomed
    import tiny_transformers
    from tiny_families import register
    if family in ("clip", "siglip"):
        name = tiny_transformers.write(tmp_path, family)
    else:
        name = tiny_biomed.register(tmp_path) if family == "biomed" else register(tmp_path, family)
    # one token each in the tiny vocabularies ("photo" is not; the seq2seq ones hold fewer words)
    words = "a photograph of a" if family in ("biomed", "clip", "siglip") else "a chest"
    model = MT.build_method("biomedcoop", name, seed=0, ctx_init=words, n_ctx=len(words.split()))
    tokens = model.class_prompt_tokens(["effusion"])
    with torch.no_grad():
        plain = model.backbone.encode_text(model.tokenizer()([f"{words} effusion."]))
        assert torch.equal(model.prompt_tower(tokens).features, plain)


def _codes_rule(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """BiomedCoOp's code as written: median / MAD z-scores, standardised, within tau."""
    s_bar = torch.median(scores)
    d_bar = torch.median(torch.abs(scores - s_bar))
    z = (scores - s_bar) / d_bar
    return torch.abs((z - torch.mean(z)) / torch.std(z)) <= tau


def test_kept_prompts_is_the_codes_outlier_rule():
    g = torch.Generator().manual_seed(0)
    for i in range(50):
        scores = torch.randn(50, generator=g, dtype=torch.float64) * 3 + 20
        scores[i % 50] += 10 * (i % 3)  # an outlier now and then
        for tau in (0.5, 1.25, 1.5):
            assert torch.equal(kept_prompts(scores, tau), _codes_rule(scores, tau))
    assert not _codes_rule(torch.tensor([1.0, 1.0, 1.0, 5.0]), 1.5).any()  # the code's MAD of 0 keeps nothing
    assert kept_prompts(torch.tensor([1.0, 1.0, 1.0, 5.0]), 1.4).tolist() == [True, True, True, False]
    assert kept_prompts(torch.tensor([2.0, 2.0, 2.0]), 1.5).all() and kept_prompts(torch.tensor([3.0]), 0.1).all()


def test_the_extra_terms_are_what_they_claim_and_at_zero_weight_it_is_coops_loss(data):
    model = MT.build_method("biomedcoop", "NEARL-Tiny", seed=1, tau=1.0)
    with torch.no_grad():
        model.ctx.add_(torch.randn(model.ctx.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    module, loss_fn, _ = _objective(model, CLASSES, list(TEMPLATES), torch.device("cpu"),
                                    _config(class_descriptions=str(data["descriptions"])))
    images, labels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 1, 2, 0, 1])
    out = module(images)
    terms = loss_fn(out, labels)
    assert set(terms) == {"cross_entropy", "sccm", "kdsp", "loss"}
    with torch.no_grad():  # the teacher written out: the first 3 descriptions of each class, the frozen text tower
        tok = model.tokenizer()
        teacher = torch.stack([F.normalize(model.backbone.encode_text(tok(DESCRIPTIONS[c][:3])), dim=-1)
                               for c in CLASSES])  # (C, P, E)
        classes = F.normalize(model.prompt_tower(class_prompt_tokens(model, CLASSES)).features, dim=-1)
        image = F.normalize(model.backbone.encode_image(images), dim=-1)
        s = model.logit_scale
        logits = s * image @ classes.T
        sccm = ((classes - F.normalize(teacher.mean(1), dim=-1)) ** 2).mean()
        scores = (s * torch.einsum("be,cpe->bcp", image, teacher)).max(dim=1).values.mean(0)
        kept = _codes_rule(scores, 1.0)
        zs = s * image @ F.normalize(teacher[:, kept].mean(1), dim=-1).T
        p = F.softmax(zs, 1)
        kdsp = (p * (p.log() - F.log_softmax(logits, 1))).sum() / logits.numel()
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["sccm"], sccm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["kdsp"], kdsp, rtol=1e-4, atol=1e-7)
    assert terms["kdsp"] > 0 and terms["sccm"] > 0
    torch.testing.assert_close(terms["loss"], terms["cross_entropy"] + terms["sccm"] + terms["kdsp"])
    # Weights 0: CoOp's objective, the same context, the same images
    model.config.sccm_lambda = model.config.kdsp_lambda = 0.0
    _, loss_zero, _ = _objective(model, CLASSES, list(TEMPLATES), torch.device("cpu"), _config())
    coop = MT.build_method("coop", "NEARL-Tiny", seed=1, n_ctx=4)
    with torch.no_grad():
        coop.ctx.copy_(model.ctx)
    ref = ClassificationLoss()(PromptClassifier(coop, class_prompt_tokens(coop, CLASSES), 3)(images), labels)
    got = loss_zero(module(images), labels)
    assert torch.equal(got["loss"], ref["loss"]) and got["kdsp"] > 0


# ----------------------------------------------------------------------------- --class-descriptions
def test_bad_class_descriptions_are_one_error_naming_the_file(tmp_path, data):
    base = ["--method", "biomedcoop", "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
            "--max-steps", 1, "--out", tmp_path / "run", "--overwrite", *FAST]
    cases = {"broken.json": ("{not json", r"broken\.json: not JSON"),
             "list.json": ('["a red image"]', r"list\.json: expected a JSON object"),
             "empty.json": (json.dumps({"red": []}), r"empty\.json: each class needs .*'red'"),
             "missing.json": (json.dumps({"red": ["a red image"]}), r"missing\.json: no descriptions for class\(es\) "
                                                                      r"'blue', 'green'")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            run([*base, "--class-descriptions", tmp_path / name])
    with pytest.raises(UserError, match=r"nowhere\.json: cannot read it"):
        run([*base, "--class-descriptions", tmp_path / "nowhere.json"])


# ----------------------------------------------------------------------------- nearl.train, restore, resume
def test_trains_through_nearl_train_restores_and_resumes(tmp_path, data, capsys):
    out = tmp_path / "run"
    argv = ["--method", "biomedcoop", "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
            "--batch-size", 6, "--warmup", 1, "--lr", 1e-2, "--eval-every", 0, "--class-descriptions",
            data["descriptions"], "--kdsp-lambda", 0.5, "--out", out, *FAST]
    summary = run([*argv, "--max-steps", 3])
    assert summary["step"] == 3 and summary["method"] == "biomedcoop"
    said = capsys.readouterr().out
    assert said.count("biomedcoop: 3 descriptions a class from") == 1 and "(as many as the class with the fewest)" in said
    losses, recs = train_losses(out)
    train = [r for r in recs if r["kind"] == "train"]
    for r in train:  # the terms, by name, and the total they make
        assert r["loss"] == pytest.approx(r["cross_entropy"] + r["sccm"] + 0.5 * r["kdsp"], rel=1e-5)
    ckpt = load_checkpoint(out)
    assert ckpt["method"] == "biomedcoop" and ckpt["config"]["kdsp_lambda"] == 0.5 and ckpt["config"]["n_ctx"] == 4
    assert set(ckpt["model"]) == {"ctx"}
    model = MT.build_from_checkpoint(ckpt)
    assert torch.equal(model.ctx, ckpt["model"]["ctx"])
    val, names = read_image_folder(data["folder"] / "val")
    res = EV.evaluate_classification(model, val, names, **KW)
    assert res["accuracy"] == pytest.approx([r for r in recs if r["kind"] == "val"][-1]["accuracy"])
    # --resume: the same run goes on to step 5 with the descriptions read again
    summary = run(["--resume", out / "last.pt", "--max-steps", 5, *FAST])
    assert summary["step"] == 5 and load_checkpoint(out)["step"] == 5
    assert "biomedcoop: 3 descriptions a class from" in capsys.readouterr().out


def test_without_descriptions_the_templates_are_the_teacher_and_it_says_so_once(tmp_path, data, capsys):
    out = tmp_path / "run"
    run(["--method", "biomedcoop", "--task", "classification", "--model", "NEARL-Tiny", "--data", data["folder"],
         "--batch-size", 6, "--max-steps", 2, "--eval-every", 0, "--templates", "a {} image.", "a photo of {}.",
         "--out", out, *FAST])
    said = capsys.readouterr().out
    assert said.count("biomedcoop: no --class-descriptions: its teacher prompts are the 2 prompt template(s)") == 1
    _, recs = train_losses(out)
    assert {"cross_entropy", "sccm", "kdsp", "loss"} <= set(recs[0])


def test_compare_runs_biomedcoop_beside_coop(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARL_DEMO_DIR", str(tmp_path / "demo"))
    out = tmp_path / "cmp"
    CMP.main(["--methods", "coop,biomedcoop", "--seeds", "0", "--max-steps", "1", "--batch-size", "8",
              "--bench-batch", "2", "--bench-iters", "1", "--method-args", "biomedcoop=--sccm-lambda 0.5",
              "--out", str(out), *FAST])
    saved = json.loads((out / "comparison.json").read_text())
    assert list(saved["methods"]) == ["coop", "biomedcoop"]
    assert [r["steps"] for r in saved["methods"]["biomedcoop"]["runs"]] == [1]
    assert load_checkpoint(out / "biomedcoop" / "seed0")["config"]["sccm_lambda"] == 0.5
    assert "| biomedcoop |" in (out / "comparison.md").read_text()
